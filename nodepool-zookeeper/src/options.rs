//! How to reach ZooKeeper: servers, chroot, TLS, timeouts.

use std::path::PathBuf;
use std::time::Duration;

use nodepool_model::config::{Config, ZooKeeperTls};
use nodepool_model::store::StoreError;

/// Nodepool's default session timeout (`zookeeper-timeout`). The client
/// crate's own default is 6 s; a shorter session than the Python peers use
/// would make us lose locks that they would keep.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// One ZooKeeper server address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Client port.
    pub port: u16,
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// TLS client files (PEM). ZooKeeper authenticates the client by its
/// certificate, and the client checks the server against the CA bundle
/// (including its host name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client private key.
    pub key: PathBuf,
}

impl From<&ZooKeeperTls> for TlsFiles {
    fn from(t: &ZooKeeperTls) -> Self {
        TlsFiles {
            ca: t.ca.clone(),
            cert: t.cert.clone(),
            key: t.key.clone(),
        }
    }
}

/// Options of a [`ZooKeeperStore`](crate::ZooKeeperStore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZooKeeperOptions {
    /// The ensemble; the client picks one and fails over to the others.
    pub servers: Vec<ServerAddress>,
    /// Everything is stored below this znode (created when missing).
    pub chroot: Option<String>,
    /// TLS; `None` connects in plaintext.
    pub tls: Option<TlsFiles>,
    /// Session timeout asked of the server (it may clamp it to its
    /// `minSessionTimeout`/`maxSessionTimeout`).
    pub session_timeout: Duration,
    /// How long [`ZooKeeperStore::connect`](crate::ZooKeeperStore::connect)
    /// tries before giving up with [`StoreError::Unavailable`]. Later
    /// reconnections (after a session expired) retry forever.
    pub connect_timeout: Duration,
    /// The subtree mirrored in memory by one persistent recursive watch;
    /// `scan()` below it reads the mirror.
    pub cache_root: String,
}

impl Default for ZooKeeperOptions {
    fn default() -> Self {
        ZooKeeperOptions {
            servers: vec![ServerAddress {
                host: "localhost".into(),
                port: nodepool_model::config::DEFAULT_ZOOKEEPER_PORT,
            }],
            chroot: None,
            tls: None,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            connect_timeout: Duration::from_secs(30),
            cache_root: nodepool_model::store::paths::ROOT.into(),
        }
    }
}

fn bad(what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("{what}: {reason}"))
}

fn check_chroot(chroot: &str, what: &str) -> Result<(), StoreError> {
    if chroot == "/" || nodepool_model::store::validate_path(chroot).is_err() {
        return Err(bad(
            what,
            format!("invalid chroot {chroot:?} (want an absolute path like /nodepool-test)"),
        ));
    }
    Ok(())
}

impl ZooKeeperOptions {
    /// Options from a Java-style connect string, `host:port[,host:port...][/chroot]`
    /// (IPv6 hosts in brackets); everything else at its default.
    pub fn from_connect_string(hosts: &str) -> Result<Self, StoreError> {
        let what = format!("ZooKeeper connect string {hosts:?}");
        let (list, chroot) = match hosts.find('/') {
            Some(i) => (&hosts[..i], Some(hosts[i..].to_owned())),
            None => (hosts, None),
        };
        if let Some(c) = &chroot {
            check_chroot(c, &what)?;
        }
        let mut servers = Vec::new();
        for part in list.split(',') {
            let part = part.trim();
            let (host, port) = if let Some(rest) = part.strip_prefix('[') {
                let Some((h, after)) = rest.split_once(']') else {
                    return Err(bad(&what, format!("unclosed '[' in {part:?}")));
                };
                (h, after.strip_prefix(':'))
            } else {
                match part.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (part, None),
                }
            };
            if host.is_empty() {
                return Err(bad(&what, format!("empty host in {part:?}")));
            }
            let port = match port {
                None => nodepool_model::config::DEFAULT_ZOOKEEPER_PORT,
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(&what, format!("invalid port {p:?}")))?,
            };
            servers.push(ServerAddress {
                host: host.to_owned(),
                port,
            });
        }
        Ok(ZooKeeperOptions {
            servers,
            chroot,
            ..ZooKeeperOptions::default()
        })
    }

    /// Options from `nodepool.yaml`: `zookeeper-servers` (with their
    /// chroot), `zookeeper-tls` and `zookeeper-timeout`.
    pub fn from_config(config: &Config) -> Result<Self, StoreError> {
        if config.zookeeper_servers.is_empty() {
            return Err(bad("zookeeper-servers", "no server configured"));
        }
        // The connect string has one chroot for the whole ensemble, and
        // Python Nodepool appends each server's chroot to its own entry;
        // servers with different chroots would mean different trees.
        let chroot = config.zookeeper_servers[0].chroot.clone();
        for (i, s) in config.zookeeper_servers.iter().enumerate() {
            if s.chroot != chroot {
                return Err(bad(
                    &format!("zookeeper-servers[{i}].chroot"),
                    format!(
                        "{:?} differs from the first server's {:?}; all servers must share one chroot",
                        s.chroot, chroot
                    ),
                ));
            }
        }
        if let Some(c) = &chroot {
            check_chroot(c, "zookeeper-servers[0].chroot")?;
        }
        Ok(ZooKeeperOptions {
            servers: config
                .zookeeper_servers
                .iter()
                .map(|s| ServerAddress {
                    host: s
                        .host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port: s.port,
                })
                .collect(),
            chroot,
            tls: config.zookeeper_tls.as_ref().map(TlsFiles::from),
            session_timeout: config.zookeeper_timeout,
            ..ZooKeeperOptions::default()
        })
    }

    /// With TLS client files.
    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// With a chroot.
    pub fn with_chroot(mut self, chroot: impl Into<String>) -> Self {
        self.chroot = Some(chroot.into());
        self
    }

    /// The servers as the client crate wants them, without chroot.
    pub(crate) fn hosts(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `zookeeper host:port,.../chroot (tls)`, for messages. Never contains
    /// key material, only file names are kept in the options anyway.
    pub fn describe(&self) -> String {
        format!(
            "zookeeper {}{}{}",
            self.hosts(),
            self.chroot.as_deref().unwrap_or(""),
            if self.tls.is_some() { " (tls)" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_nodepool_yaml() {
        let config = Config::from_yaml(
            "zookeeper-servers:\n  - host: zk1\n    chroot: /np\n  - host: ::1\n    port: 2182\n    chroot: /np\n\
             zookeeper-tls:\n  ca: /etc/ca.pem\n  cert: /etc/c.pem\n  key: /etc/c.key\n\
             labels: []\nproviders: []\n",
        )
        .expect("config parses");
        let o = ZooKeeperOptions::from_config(&config).expect("options");
        assert_eq!(o.hosts(), "zk1:2281,[::1]:2182");
        assert_eq!(o.chroot.as_deref(), Some("/np"));
        assert_eq!(
            o.session_timeout,
            Duration::from_secs(10),
            "Nodepool's default, not 6 s"
        );
        assert_eq!(
            o.tls.as_ref().map(|t| t.key.clone()),
            Some(PathBuf::from("/etc/c.key"))
        );
        assert_eq!(o.describe(), "zookeeper zk1:2281,[::1]:2182/np (tls)");

        let config = Config::from_yaml(
            "zookeeper-servers:\n  - host: a\n    chroot: /x\n  - host: b\n    chroot: /y\n\
             zookeeper-timeout: 30\nlabels: []\nproviders: []\n",
        )
        .expect("config parses");
        assert_eq!(config.zookeeper_timeout, Duration::from_secs(30));
        let e = ZooKeeperOptions::from_config(&config).expect_err("two chroots");
        assert!(e.to_string().contains("zookeeper-servers[1].chroot"), "{e}");
    }

    #[test]
    fn connect_strings_parse() {
        let o = ZooKeeperOptions::from_connect_string("a:1,[::1]:2,b/np/x").expect("parses");
        assert_eq!(o.hosts(), "a:1,[::1]:2,b:2281");
        assert_eq!(o.chroot.as_deref(), Some("/np/x"));
        assert_eq!(o.session_timeout, Duration::from_secs(10));
        assert_eq!(o.describe(), "zookeeper a:1,[::1]:2,b:2281/np/x");
        for bad in ["a:0", "a:x", ":1", "[::1:2", "a:1/", "a:1/x/"] {
            let e = ZooKeeperOptions::from_connect_string(bad).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
