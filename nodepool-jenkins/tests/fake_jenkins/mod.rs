//! A Jenkins master for tests: a real HTTP server on 127.0.0.1 that
//! behaves as Jenkins does for the calls nodepool-jenkins makes.
//!
//! - API token auth: every request needs `Authorization: Basic
//!   user:token` (401 otherwise).
//! - CSRF: `GET /crumbIssuer/api/json` opens a web session (a
//!   `JSESSIONID` cookie) and gives its crumb; a `POST` without the
//!   session's crumb gets 403, as Jenkins ≥ 2.176 does. CSRF can be
//!   switched off (the issuer then answers 404) and crumbs expired (a
//!   restart).
//! - `POST /computer/doCreateItem` checks the new-node form (name, type,
//!   json with an SSH launcher and one executor), answers 302, or 400
//!   "already exists".
//! - `GET /computer/NAME/api/json`, `POST /computer/NAME/doDelete`,
//!   `GET /computer/api/json`, `GET /computer/NAME/rssAll` (Atom),
//!   `GET /job/.../N/api/json`; 404 for unknown agents and builds.
//! - The test runs jobs on agents: [`FakeJenkins::start_job`] makes an
//!   agent busy; [`FakeJenkins::finish_job`] ends the build with a result
//!   and, like NODE_OFFLINE_WHEN_COMPLETE, can take the agent offline.
//! - Fault injection: the next N requests answer a given status.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use serde_json::{Value, json};

/// User and API token the fake accepts.
pub const USER: &str = "nodepool";
/// The API token; tests check it never shows up in logs or errors.
pub const TOKEN: &str = "11f2e3d4c5b6a7980011f2e3d4c5b6a7";

/// One agent as the fake keeps it.
#[derive(Clone, Debug)]
pub struct FakeAgent {
    /// Name.
    pub name: String,
    /// The submitted form JSON.
    pub config: Value,
    /// Connected (SSH launcher reached the node).
    pub online: bool,
    /// Taken offline on purpose.
    pub temporarily_offline: bool,
    /// Why.
    pub offline_cause: Option<String>,
    /// The build running on it: (job, number).
    pub current: Option<(String, u64)>,
    /// Builds that ran on it, oldest first.
    pub builds: Vec<(String, u64)>,
}

impl FakeAgent {
    /// The agent's label.
    pub fn label(&self) -> &str {
        self.config["labelString"].as_str().unwrap_or("")
    }

    /// The SSH host.
    pub fn host(&self) -> &str {
        self.config["launcher"]["host"].as_str().unwrap_or("")
    }
}

#[derive(Clone, Debug)]
struct FakeBuild {
    building: bool,
    result: Option<String>,
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    csrf: bool,
    connects: bool,
    /// session id → crumb
    sessions: HashMap<String, String>,
    next_session: u64,
    agents: BTreeMap<String, FakeAgent>,
    /// job → number → build
    builds: BTreeMap<String, BTreeMap<u64, FakeBuild>>,
    fail_next: VecDeque<u16>,
    log: Vec<Logged>,
}

/// The fake master. Stops when dropped.
pub struct FakeJenkins {
    /// Base URL (`http://127.0.0.1:PORT/jenkins/`): Jenkins under a context
    /// path, as it often runs.
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeJenkins {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const PREFIX: &str = "/jenkins/";

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn respond(status: u16, content_type: &str, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", content_type)
        .body(Body::from(body.into()))
        .expect("response")
}

fn json_response(v: Value) -> Response<Body> {
    respond(200, "application/json", v.to_string())
}

fn page(status: u16, title: &str, message: &str) -> Response<Body> {
    respond(
        status,
        "text/html",
        format!("<html><head><title>{title}</title></head><body><h1>{message}</h1></body></html>"),
    )
}

fn redirect(to: &str) -> Response<Body> {
    Response::builder()
        .status(302)
        .header("location", to)
        .body(Body::empty())
        .expect("response")
}

fn decode(s: &str) -> String {
    url_decode(s.as_bytes())
}

fn url_decode(b: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(h, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    body.split(|&c| c == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut it = p.splitn(2, |&c| c == b'=');
            let k = url_decode(it.next().unwrap_or_default());
            let v = url_decode(it.next().unwrap_or_default());
            (k, v)
        })
        .collect()
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    let cookie = headers.get("cookie")?.to_str().ok()?;
    cookie
        .split(';')
        .map(str::trim)
        .find_map(|c| c.strip_prefix("JSESSIONID.fake=").map(str::to_owned))
}

impl FakeJenkins {
    /// Starts the fake on a free port (CSRF on, agents connect).
    pub async fn start() -> FakeJenkins {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            csrf: true,
            connects: true,
            ..State::default()
        }));
        let base = format!("http://{addr}{PREFIX}");
        let s = state.clone();
        let b = base.clone();
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                let b = b.clone();
                async move { handle(&s, &b, method, uri, headers, body) }
            },
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        FakeJenkins {
            url: base,
            state,
            task,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state")
    }

    /// Turns CSRF protection on or off.
    pub fn set_csrf(&self, on: bool) {
        self.st().csrf = on;
    }

    /// Forgets every session and crumb (a restart).
    pub fn expire_crumbs(&self) {
        self.st().sessions.clear();
    }

    /// Whether agents created from now on come online.
    pub fn set_connects(&self, on: bool) {
        self.st().connects = on;
    }

    /// The next `n` requests are answered with `status`.
    pub fn fail_next(&self, status: u16, n: usize) {
        let mut st = self.st();
        for _ in 0..n {
            st.fail_next.push_back(status);
        }
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Logged> {
        self.st().log.clone()
    }

    /// Agents by name.
    pub fn agents(&self) -> BTreeMap<String, FakeAgent> {
        self.st().agents.clone()
    }

    /// One agent.
    pub fn agent(&self, name: &str) -> Option<FakeAgent> {
        self.st().agents.get(name).cloned()
    }

    /// Deletes an agent by hand (a person in the Jenkins UI).
    pub fn remove_agent(&self, name: &str) {
        self.st().agents.remove(name);
    }

    /// Creates an agent directly (a person, or another program).
    pub fn add_agent(&self, name: &str, label: &str, description: &str) {
        self.st().agents.insert(
            name.to_owned(),
            FakeAgent {
                name: name.to_owned(),
                config: json!({"labelString": label, "nodeDescription": description}),
                online: true,
                temporarily_offline: false,
                offline_cause: None,
                current: None,
                builds: Vec::new(),
            },
        );
    }

    /// Starts a build of `job` on an idle, online agent; returns its number.
    pub fn start_job(&self, agent: &str, job: &str) -> u64 {
        let mut st = self.st();
        let number = st
            .builds
            .get(job)
            .and_then(|b| b.keys().next_back().copied())
            .unwrap_or(0)
            + 1;
        let a = st.agents.get_mut(agent).expect("agent exists");
        assert!(
            a.online && !a.temporarily_offline,
            "agent {agent} is offline"
        );
        assert!(a.current.is_none(), "agent {agent} is busy");
        a.current = Some((job.to_owned(), number));
        a.builds.push((job.to_owned(), number));
        st.builds.entry(job.to_owned()).or_default().insert(
            number,
            FakeBuild {
                building: true,
                result: None,
            },
        );
        number
    }

    /// Ends the build running on an agent with `result`; with
    /// `offline_when_complete`, takes the agent offline as the Gearman
    /// plugin does for NODE_OFFLINE_WHEN_COMPLETE.
    pub fn finish_job(&self, agent: &str, result: &str, offline_when_complete: bool) {
        let mut st = self.st();
        let a = st.agents.get_mut(agent).expect("agent exists");
        let (job, number) = a.current.take().expect("a build runs");
        if offline_when_complete {
            a.temporarily_offline = true;
            a.online = false;
            a.offline_cause = Some("Offline due to NODE_OFFLINE_WHEN_COMPLETE".into());
        }
        let b = st
            .builds
            .get_mut(&job)
            .and_then(|b| b.get_mut(&number))
            .expect("build");
        b.building = false;
        b.result = Some(result.to_owned());
    }

    /// `start_job` + `finish_job` with NODE_OFFLINE_WHEN_COMPLETE.
    pub fn run_job(&self, agent: &str, job: &str, result: &str) -> u64 {
        let n = self.start_job(agent, job);
        self.finish_job(agent, result, true);
        n
    }
}

fn job_path(job: &str) -> String {
    job.split('/')
        .map(|p| format!("job/{p}/"))
        .collect::<String>()
}

fn handle(
    state: &Mutex<State>,
    base: &str,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let mut st = state.lock().expect("state");
    let path = uri.path().to_owned();
    let resp = route(&mut st, base, &method, &path, &headers, &body);
    let status = resp.status().as_u16();
    st.log.push(Logged {
        method: method.to_string(),
        path,
        status,
    });
    resp
}

fn route(
    st: &mut State,
    base: &str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<Body> {
    if let Some(status) = st.fail_next.pop_front() {
        return page(status, "Error", &format!("injected {status}"));
    }
    let expected = format!("Basic {}", b64(format!("{USER}:{TOKEN}").as_bytes()));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return page(401, "Unauthorized", "Invalid password/token for user");
    }
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return page(404, "Not Found", "Not Found");
    };
    if *method == Method::POST && st.csrf {
        let sid = session_of(headers);
        let sent = headers.get("jenkins-crumb").and_then(|v| v.to_str().ok());
        let valid = match (&sid, sent) {
            (Some(sid), Some(c)) => st.sessions.get(sid).map(String::as_str) == Some(c),
            _ => false,
        };
        if !valid {
            return page(
                403,
                "Error 403 No valid crumb was included in the request",
                "No valid crumb was included in the request",
            );
        }
    }
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["crumbIssuer", "api", "json"]) => {
            if !st.csrf {
                return page(404, "Not Found", "Not Found");
            }
            st.next_session += 1;
            let sid = format!("s{}", st.next_session);
            let crumb = format!("crumb-{}-{}", sid, st.next_session * 7919);
            st.sessions.insert(sid.clone(), crumb.clone());
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("set-cookie", format!("JSESSIONID.fake={sid}; Path=/; HttpOnly"))
                .body(Body::from(
                    json!({"_class": "hudson.security.csrf.DefaultCrumbIssuer", "crumb": crumb, "crumbRequestField": "Jenkins-Crumb"}).to_string(),
                ))
                .expect("response")
        }
        ("POST", ["computer", "doCreateItem"]) => {
            let form = parse_form(body);
            let (Some(name), Some(kind), Some(json_text)) =
                (form.get("name"), form.get("type"), form.get("json"))
            else {
                return page(400, "Error", "Missing name, type or json");
            };
            if kind != "hudson.slaves.DumbSlave$DescriptorImpl" && kind != "hudson.slaves.DumbSlave"
            {
                return page(400, "Error", &format!("No node type ‘{kind}’ is known"));
            }
            if st.agents.contains_key(name.as_str()) {
                return page(
                    400,
                    "Error",
                    &format!("Agent called ‘{name}’ already exists"),
                );
            }
            let Ok(config) = serde_json::from_str::<Value>(json_text) else {
                return page(400, "Error", "bad json");
            };
            if config["launcher"]["stapler-class"] != "hudson.plugins.sshslaves.SSHLauncher"
                || config["launcher"]["host"]
                    .as_str()
                    .is_none_or(str::is_empty)
                || config["numExecutors"] != 1
            {
                return page(400, "Error", "unexpected agent configuration");
            }
            let online = st.connects;
            st.agents.insert(
                name.clone(),
                FakeAgent {
                    name: name.clone(),
                    config,
                    online,
                    temporarily_offline: false,
                    offline_cause: None,
                    current: None,
                    builds: Vec::new(),
                },
            );
            redirect(&format!("{base}computer/"))
        }
        ("GET", ["computer", "api", "json"]) => {
            let mut list = vec![json!({"displayName": "Built-In Node"})];
            list.extend(st.agents.values().map(
                |a| json!({"displayName": a.name, "description": a.config["nodeDescription"]}),
            ));
            json_response(json!({"computer": list}))
        }
        ("GET", ["computer", name, "api", "json"]) => {
            let name = decode(name);
            let Some(a) = st.agents.get(&name) else {
                return page(404, "Not Found", "Not Found");
            };
            let executable = a.current.as_ref().map(|(job, n)| {
                json!({"_class": "hudson.model.FreeStyleBuild", "number": n, "url": format!("{base}{}{n}/", job_path(job))})
            });
            json_response(json!({
                "_class": "hudson.slaves.SlaveComputer",
                "displayName": a.name,
                "offline": !a.online,
                "temporarilyOffline": a.temporarily_offline,
                "idle": a.current.is_none(),
                "offlineCauseReason": a.offline_cause.clone().unwrap_or_default(),
                "executors": [{"currentExecutable": executable}],
            }))
        }
        ("POST", ["computer", name, "doDelete"]) => {
            let name = decode(name);
            if st.agents.remove(&name).is_none() {
                return page(404, "Not Found", "Not Found");
            }
            redirect(&format!("{base}computer/"))
        }
        ("GET", ["computer", name, "rssAll"]) => {
            let name = decode(name);
            let Some(a) = st.agents.get(&name) else {
                return page(404, "Not Found", "Not Found");
            };
            let mut feed = format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom"><title>{name} all builds</title><link rel="alternate" type="text/html" href="{base}computer/{name}/"></link>"#
            );
            for (job, n) in a.builds.iter().rev() {
                feed.push_str(&format!(
                    r#"<entry><title>{job} #{n}</title><link rel="alternate" type="text/html" href="{base}{}{n}/"></link><id>tag:hudson.dev.java.net,2008:{job}:{n}</id></entry>"#,
                    job_path(job)
                ));
            }
            feed.push_str("</feed>");
            respond(200, "application/atom+xml", feed)
        }
        ("GET", [.., number, "api", "json"]) if parts.first() == Some(&"job") => {
            let job_parts = &parts[..parts.len() - 3];
            let mut names = Vec::new();
            for pair in job_parts.chunks(2) {
                match pair {
                    ["job", n] => names.push(decode(n)),
                    _ => return page(404, "Not Found", "Not Found"),
                }
            }
            let job = names.join("/");
            let Ok(number) = number.parse::<u64>() else {
                return page(404, "Not Found", "Not Found");
            };
            match st.builds.get(&job).and_then(|b| b.get(&number)) {
                Some(b) => json_response(json!({
                    "_class": "hudson.model.FreeStyleBuild",
                    "number": number,
                    "building": b.building,
                    "result": b.result,
                })),
                None => page(404, "Not Found", "Not Found"),
            }
        }
        _ => page(404, "Not Found", "Not Found"),
    }
}
