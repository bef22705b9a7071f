//! The Jenkins endpoints as values (no IO here).
//!
//! Each endpoint is a small struct implementing [`Endpoint`]: it builds an
//! [`ApiRequest`] (method, path below the Jenkins root, query, form body,
//! the statuses that mean success, whether a CSRF crumb is needed) and
//! parses an [`ApiResponse`]. The [`JenkinsClient`](crate::JenkinsClient)
//! is the one place that sends them, adding authentication, the crumb,
//! timeouts, retries and error mapping. So request and response shapes are
//! unit-tested here without a network.

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

/// A request, fully described, not yet sent.
#[derive(Clone, PartialEq)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Path below the Jenkins root, without a leading `/`, segments
    /// already percent-encoded (`computer/agent-1/api/json`).
    pub path: String,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// A form body (`application/x-www-form-urlencoded`), if any.
    pub form: Option<Vec<(String, String)>>,
    /// Statuses that mean success.
    pub expected: &'static [u16],
    /// Whether the call changes something and so needs a CSRF crumb.
    pub needs_crumb: bool,
}

impl std::fmt::Debug for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Form values are not secret today, but keep bodies out of logs.
        f.debug_struct("ApiRequest")
            .field("call", &self.describe())
            .field("query", &self.query)
            .field(
                "form",
                &self
                    .form
                    .as_ref()
                    .map(|f| f.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()),
            )
            .field("expected", &self.expected)
            .finish()
    }
}

impl ApiRequest {
    /// A `GET` expecting 200.
    pub fn get(path: impl Into<String>) -> Self {
        ApiRequest {
            method: Method::GET,
            path: path.into(),
            query: Vec::new(),
            form: None,
            expected: &[200],
            needs_crumb: false,
        }
    }

    /// A `POST` with a crumb, expecting 200 or Jenkins' 302 back to a page.
    pub fn post(path: impl Into<String>) -> Self {
        ApiRequest {
            method: Method::POST,
            path: path.into(),
            query: Vec::new(),
            form: None,
            expected: &[200, 302],
            needs_crumb: true,
        }
    }

    /// Adds a query parameter.
    pub fn query(mut self, k: &str, v: impl Into<String>) -> Self {
        self.query.push((k.to_owned(), v.into()));
        self
    }

    /// `POST /path` for messages (no query, no host).
    pub fn describe(&self) -> String {
        format!("{} /{}", self.method, self.path)
    }
}

/// A response as the client received it.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl ApiResponse {
    /// The body as a JSON type.
    pub fn json<T: for<'de> Deserialize<'de>>(&self, call: &str) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::Decode(format!("{call}: unexpected answer: {e}")))
    }
}

/// One Jenkins call: how to ask, and how to read the answer.
pub trait Endpoint {
    /// What a successful call gives.
    type Output;
    /// The request.
    fn request(&self) -> ApiRequest;
    /// Reads a response with an expected status.
    fn parse(&self, response: ApiResponse) -> Result<Self::Output, ApiError>;
}

/// Percent-encodes one path segment (an agent or job name).
pub fn segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        // form encoding writes spaces as '+', which a path keeps literally
        .collect::<String>()
        .replace('+', "%20")
}

// ----- CSRF crumb -------------------------------------------------------

/// `GET /crumbIssuer/api/json`: a CSRF crumb for changing calls. A 404
/// means CSRF protection is off (the client then sends none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetCrumb;

/// A CSRF crumb and the session cookies it belongs to (Jenkins ties
/// crumbs to the web session since 2.176).
#[derive(Clone, PartialEq, Eq)]
pub struct Crumb {
    /// Header to send it in (`Jenkins-Crumb`).
    pub field: String,
    /// The crumb.
    pub value: String,
    /// `name=value` of every cookie the issuer set.
    pub cookies: Vec<String>,
}

impl std::fmt::Debug for Crumb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A crumb plus its session cookie act as credentials for a while.
        f.debug_struct("Crumb")
            .field("field", &self.field)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CrumbBody {
    crumb: String,
    crumb_request_field: String,
}

impl Endpoint for GetCrumb {
    type Output = Crumb;

    fn request(&self) -> ApiRequest {
        ApiRequest::get("crumbIssuer/api/json")
    }

    fn parse(&self, response: ApiResponse) -> Result<Crumb, ApiError> {
        let body: CrumbBody = response.json("GET /crumbIssuer/api/json")?;
        let cookies = response
            .headers
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .map(|c| c.trim().to_owned())
            .filter(|c| c.contains('='))
            .collect();
        Ok(Crumb {
            field: body.crumb_request_field,
            value: body.crumb,
            cookies,
        })
    }
}

// ----- agents -----------------------------------------------------------

/// How Jenkins checks an agent's SSH host key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// Compare with this key (`<type> <base64>`, as nodescan found it).
    Manual(String),
    /// Do not check (no key known).
    None,
}

/// A permanent agent with an SSH launcher, one executor and one label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSpec {
    /// Agent name.
    pub name: String,
    /// Free text shown by Jenkins.
    pub description: String,
    /// Label jobs select it by.
    pub label: String,
    /// Remote FS root.
    pub remote_fs_root: String,
    /// SSH host.
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// Jenkins credentials id for SSH.
    pub credentials_id: Option<String>,
    /// Host key verification.
    pub host_key: HostKeyCheck,
}

/// The descriptor of permanent agents (as python-jenkins sends it).
pub const DUMB_SLAVE: &str = "hudson.slaves.DumbSlave$DescriptorImpl";
/// The SSH Build Agents plugin's launcher.
pub const SSH_LAUNCHER: &str = "hudson.plugins.sshslaves.SSHLauncher";

impl AgentSpec {
    /// The `json` form field: the agent's configuration as Jenkins' "new
    /// node" form submits it.
    pub fn form_json(&self) -> Value {
        let verification = match &self.host_key {
            HostKeyCheck::Manual(key) => json!({
                "stapler-class": "hudson.plugins.sshslaves.verifiers.ManuallyProvidedKeyVerificationStrategy",
                "$class": "hudson.plugins.sshslaves.verifiers.ManuallyProvidedKeyVerificationStrategy",
                "key": key,
            }),
            HostKeyCheck::None => json!({
                "stapler-class": "hudson.plugins.sshslaves.verifiers.NonVerifyingKeyVerificationStrategy",
                "$class": "hudson.plugins.sshslaves.verifiers.NonVerifyingKeyVerificationStrategy",
            }),
        };
        let mut launcher = json!({
            "stapler-class": SSH_LAUNCHER,
            "$class": SSH_LAUNCHER,
            "host": self.host,
            "port": self.port,
            "sshHostKeyVerificationStrategy": verification,
        });
        if let (Some(id), Some(obj)) = (&self.credentials_id, launcher.as_object_mut()) {
            obj.insert("credentialsId".into(), Value::String(id.clone()));
        }
        json!({
            "name": self.name,
            "nodeDescription": self.description,
            "numExecutors": 1,
            "remoteFS": self.remote_fs_root,
            "labelString": self.label,
            // Only jobs asking for its label run on it.
            "mode": "EXCLUSIVE",
            "type": DUMB_SLAVE,
            "retentionStrategy": {"stapler-class": "hudson.slaves.RetentionStrategy$Always"},
            "nodeProperties": {"stapler-class-bag": "true"},
            "launcher": launcher,
        })
    }
}

/// `POST /computer/doCreateItem`: creates a permanent agent. Jenkins
/// answers 302 (back to the agent list); 400 when the name is taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateAgent(pub AgentSpec);

impl Endpoint for CreateAgent {
    type Output = ();

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::post("computer/doCreateItem");
        r.form = Some(vec![
            ("name".into(), self.0.name.clone()),
            ("type".into(), DUMB_SLAVE.into()),
            ("json".into(), self.0.form_json().to_string()),
        ]);
        r
    }

    fn parse(&self, _response: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

/// `GET /computer/NAME/api/json`: an agent's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetComputer(pub String);

/// The fields asked for (Jenkins' `tree` filter keeps the answer small).
pub const COMPUTER_TREE: &str = "displayName,offline,temporarilyOffline,idle,offlineCauseReason,executors[currentExecutable[url,number]]";

/// An agent as Jenkins shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComputerInfo {
    /// Name.
    pub name: String,
    /// Not connected (launching, failed to launch, or taken offline).
    pub offline: bool,
    /// Taken offline on purpose (by a person or, with
    /// NODE_OFFLINE_WHEN_COMPLETE, by the Gearman plugin after its job).
    pub temporarily_offline: bool,
    /// No executor is busy.
    pub idle: bool,
    /// Why it is offline, if someone said.
    pub offline_cause: Option<String>,
    /// URLs of the builds running on it now.
    pub current_builds: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ComputerBody {
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    offline: bool,
    #[serde(default)]
    temporarily_offline: bool,
    #[serde(default)]
    idle: bool,
    #[serde(default)]
    offline_cause_reason: Option<String>,
    #[serde(default)]
    executors: Vec<ExecutorBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutorBody {
    #[serde(default)]
    current_executable: Option<ExecutableBody>,
}

#[derive(Deserialize)]
struct ExecutableBody {
    #[serde(default)]
    url: Option<String>,
}

impl Endpoint for GetComputer {
    type Output = ComputerInfo;

    fn request(&self) -> ApiRequest {
        ApiRequest::get(format!("computer/{}/api/json", segment(&self.0)))
            .query("tree", COMPUTER_TREE)
    }

    fn parse(&self, response: ApiResponse) -> Result<ComputerInfo, ApiError> {
        let b: ComputerBody = response.json(&self.request().describe())?;
        Ok(ComputerInfo {
            name: b.display_name,
            offline: b.offline,
            temporarily_offline: b.temporarily_offline,
            idle: b.idle,
            offline_cause: b.offline_cause_reason.filter(|r| !r.is_empty()),
            current_builds: b
                .executors
                .into_iter()
                .filter_map(|e| e.current_executable?.url)
                .collect(),
        })
    }
}

/// `POST /computer/NAME/doDelete`: removes an agent (302 back to the list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteAgent(pub String);

impl Endpoint for DeleteAgent {
    type Output = ();

    fn request(&self) -> ApiRequest {
        ApiRequest::post(format!("computer/{}/doDelete", segment(&self.0)))
    }

    fn parse(&self, _response: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

/// `GET /computer/api/json`: the names of every agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListAgents;

#[derive(Deserialize)]
struct ComputerSetBody {
    #[serde(default)]
    computer: Vec<NamedBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NamedBody {
    display_name: String,
}

impl Endpoint for ListAgents {
    type Output = Vec<String>;

    fn request(&self) -> ApiRequest {
        ApiRequest::get("computer/api/json").query("tree", "computer[displayName]")
    }

    fn parse(&self, response: ApiResponse) -> Result<Vec<String>, ApiError> {
        let b: ComputerSetBody = response.json("GET /computer/api/json")?;
        Ok(b.computer.into_iter().map(|c| c.display_name).collect())
    }
}

/// `GET /computer/api/json`: every agent's name and description.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListAgentDescriptions;

#[derive(Deserialize)]
struct DescribedSetBody {
    #[serde(default)]
    computer: Vec<DescribedBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribedBody {
    display_name: String,
    #[serde(default)]
    description: Option<String>,
}

impl Endpoint for ListAgentDescriptions {
    type Output = Vec<(String, String)>;

    fn request(&self) -> ApiRequest {
        ApiRequest::get("computer/api/json").query("tree", "computer[displayName,description]")
    }

    fn parse(&self, response: ApiResponse) -> Result<Vec<(String, String)>, ApiError> {
        let b: DescribedSetBody = response.json("GET /computer/api/json")?;
        Ok(b.computer
            .into_iter()
            .map(|c| (c.display_name, c.description.unwrap_or_default()))
            .collect())
    }
}

// ----- builds -----------------------------------------------------------

/// `GET /computer/NAME/rssAll`: the builds that ran on an agent, newest
/// first, as build paths (the only place Jenkins lists an agent's builds;
/// the computer's JSON shows only running ones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentBuilds(pub String);

impl Endpoint for AgentBuilds {
    type Output = Vec<String>;

    fn request(&self) -> ApiRequest {
        ApiRequest::get(format!("computer/{}/rssAll", segment(&self.0)))
    }

    fn parse(&self, response: ApiResponse) -> Result<Vec<String>, ApiError> {
        let text = String::from_utf8_lossy(&response.body);
        Ok(atom_entry_links(&text)
            .into_iter()
            .filter_map(|u| build_path(&u))
            .collect())
    }
}

/// The `href` of each `<entry>`'s `<link>` in an Atom feed, in order.
/// Jenkins writes its feeds from a fixed template, so a scan is enough.
fn atom_entry_links(feed: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in feed.split("<entry>").skip(1) {
        let entry = entry.split("</entry>").next().unwrap_or(entry);
        let Some(link) = entry.split("<link").nth(1) else {
            continue;
        };
        let Some(rest) = link.split("href=\"").nth(1) else {
            continue;
        };
        if let Some(href) = rest.split('"').next() {
            out.push(href.replace("&amp;", "&"));
        }
    }
    out
}

/// The path of a build below the Jenkins root (`job/a/job/b/42/`), from
/// its absolute URL. Jenkins writes URLs with its configured root URL,
/// which may differ from the one we reach it by (a proxy), so only the
/// part from `/job/` on is kept and joined to our base.
pub fn build_path(url: &str) -> Option<String> {
    let idx = url.find("/job/")?;
    let mut path = url[idx + 1..].to_owned();
    if !path.ends_with('/') {
        path.push('/');
    }
    Some(path)
}

/// The full job name of a build path: `job/a/job/b/42/` → `a/b`.
pub fn job_name(build_path: &str) -> Option<String> {
    let parts: Vec<&str> = build_path.trim_matches('/').split('/').collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i + 1 < parts.len() {
        if parts[i] != "job" {
            return None;
        }
        names.push(percent_decode(parts[i + 1])?);
        i += 2;
    }
    // What is left is the build number.
    (i + 1 == parts.len() && !names.is_empty()).then(|| names.join("/"))
}

/// Decodes `%XX` escapes of a path segment (`+` stays `+` in paths).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /job/.../N/api/json`: a build's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetBuild(pub String);

/// A build as Jenkins shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The job's full name (`folder/job`).
    pub job: String,
    /// Build number.
    pub number: u64,
    /// Still running.
    pub building: bool,
    /// `SUCCESS`, `UNSTABLE`, `FAILURE`, `NOT_BUILT`, `ABORTED`; `None`
    /// while running.
    pub result: Option<String>,
}

impl BuildInfo {
    /// Whether the build finished other than `SUCCESS` (as Python
    /// Nodepool's job holds counted a failure).
    pub fn failed(&self) -> bool {
        !self.building && self.result.as_deref().is_some_and(|r| r != "SUCCESS")
    }
}

#[derive(Deserialize)]
struct BuildBody {
    #[serde(default)]
    number: u64,
    #[serde(default)]
    building: bool,
    #[serde(default)]
    result: Option<String>,
}

impl Endpoint for GetBuild {
    type Output = BuildInfo;

    fn request(&self) -> ApiRequest {
        ApiRequest::get(format!("{}api/json", self.0)).query("tree", "number,building,result")
    }

    fn parse(&self, response: ApiResponse) -> Result<BuildInfo, ApiError> {
        let b: BuildBody = response.json(&self.request().describe())?;
        Ok(BuildInfo {
            job: job_name(&self.0).unwrap_or_default(),
            number: b.number,
            building: b.building,
            result: b.result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn response(status: u16, body: &str) -> ApiResponse {
        ApiResponse {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn spec() -> AgentSpec {
        AgentSpec {
            name: "small-sim-0000000001".into(),
            description: "nodepool node 0000000001".into(),
            label: "small".into(),
            remote_fs_root: "/home/jenkins".into(),
            host: "203.0.113.5".into(),
            port: 2222,
            credentials_id: Some("ssh-key".into()),
            host_key: HostKeyCheck::Manual("ssh-ed25519 AAAAC3Nz".into()),
        }
    }

    #[test]
    fn crumb_is_read_with_its_session_cookies() {
        let mut r = response(
            200,
            r#"{"_class":"hudson.security.csrf.DefaultCrumbIssuer","crumb":"abc123","crumbRequestField":"Jenkins-Crumb"}"#,
        );
        r.headers.append(
            reqwest::header::SET_COOKIE,
            HeaderValue::from_static("JSESSIONID.1a2b=node0xyz; Path=/; HttpOnly"),
        );
        let c = GetCrumb.parse(r).expect("crumb");
        assert_eq!(c.field, "Jenkins-Crumb");
        assert_eq!(c.value, "abc123");
        assert_eq!(c.cookies, ["JSESSIONID.1a2b=node0xyz"]);
        assert!(!format!("{c:?}").contains("abc123"), "{c:?}");
        assert_eq!(GetCrumb.request().path, "crumbIssuer/api/json");
        assert!(!GetCrumb.request().needs_crumb);
    }

    #[test]
    fn create_agent_posts_the_new_node_form() {
        let r = CreateAgent(spec()).request();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, "computer/doCreateItem");
        assert!(r.needs_crumb);
        assert_eq!(r.expected, &[200, 302]);
        let form = r.form.expect("form");
        assert_eq!(form[0], ("name".into(), "small-sim-0000000001".into()));
        assert_eq!(form[1], ("type".into(), DUMB_SLAVE.into()));
        let j: Value = serde_json::from_str(&form[2].1).expect("json");
        assert_eq!(j["numExecutors"], 1);
        assert_eq!(j["labelString"], "small");
        assert_eq!(j["remoteFS"], "/home/jenkins");
        assert_eq!(j["mode"], "EXCLUSIVE");
        assert_eq!(j["launcher"]["stapler-class"], SSH_LAUNCHER);
        assert_eq!(j["launcher"]["host"], "203.0.113.5");
        assert_eq!(j["launcher"]["port"], 2222);
        assert_eq!(j["launcher"]["credentialsId"], "ssh-key");
        assert_eq!(
            j["launcher"]["sshHostKeyVerificationStrategy"]["key"],
            "ssh-ed25519 AAAAC3Nz"
        );
        let mut s = spec();
        s.credentials_id = None;
        s.host_key = HostKeyCheck::None;
        let j = s.form_json();
        assert!(j["launcher"].get("credentialsId").is_none());
        assert!(
            j["launcher"]["sshHostKeyVerificationStrategy"]["$class"]
                .as_str()
                .is_some_and(|c| c.ends_with("NonVerifyingKeyVerificationStrategy"))
        );
    }

    #[test]
    fn computer_state_is_read_with_running_builds() {
        let r = GetComputer("a b".into()).request();
        assert_eq!(r.path, "computer/a%20b/api/json");
        assert_eq!(r.query, [("tree".to_owned(), COMPUTER_TREE.to_owned())]);
        let info = GetComputer("a".into())
            .parse(response(
                200,
                r#"{"displayName":"a","offline":false,"temporarilyOffline":false,"idle":false,
                    "offlineCauseReason":"","executors":[{"currentExecutable":{"number":7,"url":"http://j/job/x/7/"}},{"currentExecutable":null}]}"#,
            ))
            .expect("parse");
        assert_eq!(
            info,
            ComputerInfo {
                name: "a".into(),
                offline: false,
                temporarily_offline: false,
                idle: false,
                offline_cause: None,
                current_builds: vec!["http://j/job/x/7/".into()],
            }
        );
        let err = GetComputer("a".into())
            .parse(response(200, "<html>"))
            .expect_err("not json");
        assert!(matches!(err, ApiError::Decode(_)), "{err}");
    }

    #[test]
    fn agent_names_are_encoded_in_paths() {
        assert_eq!(
            DeleteAgent("x/y".into()).request().path,
            "computer/x%2Fy/doDelete"
        );
        assert!(DeleteAgent("x".into()).request().needs_crumb);
        assert_eq!(segment("plain-name_1.2"), "plain-name_1.2");
    }

    #[test]
    fn agent_list_is_read() {
        let names = ListAgents
            .parse(response(
                200,
                r#"{"computer":[{"displayName":"Built-In Node"},{"displayName":"a"}]}"#,
            ))
            .expect("parse");
        assert_eq!(names, ["Built-In Node", "a"]);
    }

    #[test]
    fn agent_descriptions_are_read() {
        let list = ListAgentDescriptions
            .parse(response(
                200,
                r#"{"computer":[{"displayName":"Built-In Node","description":null},{"displayName":"a","description":"d"}]}"#,
            ))
            .expect("parse");
        assert_eq!(
            list,
            [
                ("Built-In Node".to_owned(), String::new()),
                ("a".to_owned(), "d".to_owned())
            ]
        );
    }

    #[test]
    fn builds_of_an_agent_come_from_its_feed() {
        let feed = r#"<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom"><title>a all builds</title><link rel="alternate" type="text/html" href="http://j/computer/a/"></link><updated>2024-01-01T00:00:00Z</updated><author><name>Jenkins Server</name></author><id>urn:uuid:903deee0-7bfa-11db-9fe1-0800200c9a66</id><entry><title>f » x #8 (broken since this build)</title><link rel="alternate" type="text/html" href="http://proxy.example/ci/job/f/job/x/8/"></link><id>tag:hudson.dev.java.net,2008:http://j/job/x/:8</id></entry><entry><title>y #3 (stable)</title><link rel="alternate" type="text/html" href="http://j/job/y/3/"></link></entry></feed>"#;
        let paths = AgentBuilds("a".into())
            .parse(response(200, feed))
            .expect("parse");
        assert_eq!(paths, ["job/f/job/x/8/", "job/y/3/"]);
        assert!(
            AgentBuilds("a".into())
                .parse(response(200, "<feed></feed>"))
                .expect("parse")
                .is_empty()
        );
    }

    #[test]
    fn job_names_come_from_build_paths() {
        assert_eq!(job_name("job/x/8/").as_deref(), Some("x"));
        assert_eq!(job_name("job/f/job/x/8/").as_deref(), Some("f/x"));
        assert_eq!(job_name("job/a%20b+c/1/").as_deref(), Some("a b+c"));
        assert_eq!(job_name("job/a%2/1/"), None);
        assert_eq!(job_name("view/v/8/"), None);
        assert_eq!(job_name("job/x/"), None);
        assert_eq!(
            build_path("https://j.example/job/x/8"),
            Some("job/x/8/".into())
        );
        assert_eq!(build_path("https://j.example/computer/x"), None);
    }

    #[test]
    fn build_results_are_read() {
        let e = GetBuild("job/f/job/x/8/".into());
        assert_eq!(e.request().path, "job/f/job/x/8/api/json");
        let b = e
            .parse(response(
                200,
                r#"{"_class":"hudson.model.FreeStyleBuild","building":false,"number":8,"result":"FAILURE"}"#,
            ))
            .expect("parse");
        assert_eq!(b.job, "f/x");
        assert_eq!(b.number, 8);
        assert!(b.failed());
        let running = e
            .parse(response(
                200,
                r#"{"building":true,"number":8,"result":null}"#,
            ))
            .expect("parse");
        assert!(!running.failed());
        let ok = e
            .parse(response(
                200,
                r#"{"building":false,"number":8,"result":"SUCCESS"}"#,
            ))
            .expect("parse");
        assert!(!ok.failed());
    }
}
