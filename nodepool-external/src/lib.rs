//! `driver: external`: a [`Provider`] implemented by any program.
//!
//! The program (the provider's `command`) runs as a long-lived child of
//! the launcher and speaks JSON lines on stdin/stdout: a version handshake,
//! then one request per line, each answered by one line (the protocol is
//! described in `docs/external-provider.md`). Calls are made one at a time
//! and each is bounded by the provider's `timeout`. A program that answers
//! with something other than a protocol answer, exits, or does not answer
//! in time fails that call with an error naming the program and the
//! operation, and is killed (its whole process group); the next call starts
//! it again. It never outlives the provider.

mod program;
mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use nodepool_model::config::{Driver, ExternalProgram, PoolLabel, ProviderConfig};
use nodepool_model::model::{Limits, Resources};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageUploadSpec, Instance, InstanceSpec, Provider,
    ProviderError, ResourceKind, poll_until_active,
};
use serde_json::{Value, json};

use program::{Broken, Running};
pub use program::{MIN_START_ALLOWANCE, PROTOCOL_VERSION};

/// A provider whose cloud is an external program.
#[derive(Debug)]
pub struct ExternalProvider {
    name: String,
    program: ExternalProgram,
    running: tokio::sync::Mutex<Option<Running>>,
    next_id: AtomicU64,
    /// From the handshake's `capabilities.skip_nodescan`; read without a
    /// call, so it is remembered (nodescan only follows a wait, which made
    /// the handshake).
    skip_nodescan: AtomicBool,
}

impl ExternalProvider {
    /// A provider for a `driver: external` provider configuration. The
    /// program is started at the first call.
    pub fn new(pc: &ProviderConfig) -> Result<Self, ProviderError> {
        let Driver::External(program) = &pc.driver else {
            return Err(ProviderError::InvalidRequest(format!(
                "provider {}: driver {} is not external",
                pc.name,
                pc.driver.name()
            )));
        };
        Ok(ExternalProvider {
            name: pc.name.clone(),
            program: program.clone(),
            running: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            skip_nodescan: AtomicBool::new(false),
        })
    }

    /// The handshake's `capabilities` (starting the program if needed).
    pub async fn capabilities(&self) -> Result<Value, ProviderError> {
        let mut running = self.running.lock().await;
        let r = self.ensure_started(&mut running, "hello").await?;
        Ok(r.capabilities.clone())
    }

    /// The process id of the running program, if one runs (for tests and
    /// diagnostics).
    pub async fn program_pid(&self) -> Option<u32> {
        // `Running` hides its child; the pid is only for observers.
        self.running.lock().await.as_ref().and_then(Running::pid)
    }

    fn failure(&self, op: &str, why: Broken) -> ProviderError {
        let who = format!(
            "external provider {}: program {:?}, op {op}",
            self.name,
            self.program.command.join(" ")
        );
        match why {
            Broken::Hung(t) => ProviderError::Timeout(format!(
                "{who}: no answer within {:.1} s; the program was killed and is started again at the next call",
                t.as_secs_f64()
            )),
            Broken::Failed(m) => ProviderError::Transient(format!(
                "{who}: {m}; the program was stopped and is started again at the next call"
            )),
        }
    }

    async fn ensure_started<'a>(
        &self,
        running: &'a mut Option<Running>,
        op: &str,
    ) -> Result<&'a mut Running, ProviderError> {
        if running.as_ref().is_some_and(Running::owes_an_answer) {
            tracing::info!(provider = %self.name, "a cancelled call left the external provider program owing an answer; starting it again");
            *running = None;
        }
        if running.is_none() {
            let r = Running::start(&self.program, &self.name)
                .await
                .map_err(|why| self.failure(op, why))?;
            let skip = r
                .capabilities
                .get("skip_nodescan")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            self.skip_nodescan.store(skip, Ordering::Relaxed);
            tracing::info!(provider = %self.name, capabilities = %r.capabilities, "external provider program started");
            *running = Some(r);
        }
        running
            .as_mut()
            .ok_or_else(|| ProviderError::Other("program not running".into()))
    }

    /// One request: `{"id", "op", ...args}` → the answer's `result`.
    async fn call(&self, op: &str, args: Value) -> Result<Value, ProviderError> {
        self.call_within(op, args, self.program.timeout).await
    }

    async fn call_within(
        &self,
        op: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, ProviderError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({"id": id, "op": op});
        // The arguments sit beside `id` and `op` (and never replace them).
        if let (Value::Object(req), Value::Object(args)) = (&mut request, args) {
            for (k, v) in args {
                req.entry(k).or_insert(v);
            }
        }
        let mut running = self.running.lock().await;
        let r = self.ensure_started(&mut running, op).await?;
        let answer = match tokio::time::timeout(timeout, r.exchange(&request)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(why)) => {
                *running = None;
                return Err(self.failure(op, why));
            }
            Err(_) => {
                *running = None;
                return Err(self.failure(op, Broken::Hung(timeout)));
            }
        };
        if answer.get("id").and_then(Value::as_u64) != Some(id) {
            *running = None;
            return Err(self.failure(
                op,
                Broken::Failed(format!(
                    "answered request {id} with id {}",
                    answer
                        .get("id")
                        .map_or_else(|| "(none)".into(), Value::to_string)
                )),
            ));
        }
        match answer.get("ok") {
            Some(Value::Bool(true)) => Ok(answer.get("result").cloned().unwrap_or(Value::Null)),
            Some(Value::Bool(false)) => Err(wire::refusal(&self.name, op, &answer)),
            _ => {
                *running = None;
                Err(self.failure(
                    op,
                    Broken::Failed(format!(
                        "answered without a boolean `ok`: {}",
                        program::shorten(&answer.to_string())
                    )),
                ))
            }
        }
    }

    /// Decodes a result, or fails naming the program and the op.
    fn decode<T>(
        &self,
        op: &str,
        result: &Value,
        f: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Result<T, ProviderError> {
        f(result).map_err(|why| {
            ProviderError::Other(format!(
                "external provider {}: program {:?}, op {op}: bad result: {why}",
                self.name,
                self.program.command.join(" ")
            ))
        })
    }
}

/// How often waits ask the program again.
const POLL: Duration = Duration::from_millis(200);

#[async_trait]
impl Provider for ExternalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        let r = self.call("quota_limits", json!({})).await?;
        self.decode("quota_limits", &r, wire::limits)
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        let r = self
            .call("label_resources", json!({"label": wire::label(label)}))
            .await?;
        self.decode("label_resources", &r, wire::resources)
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let r = self
            .call("create_server", json!({"spec": wire::spec(spec)}))
            .await?;
        self.decode("create_server", &r, |v| wire::string_field(v, "id"))
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        _spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        poll_until_active(self, external_id, POLL).await
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        let r = self
            .call("get_server", json!({"server_id": external_id}))
            .await?;
        if r.is_null() {
            return Ok(None);
        }
        self.decode("get_server", &r, wire::instance).map(Some)
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        let r = self.call("list_servers", json!({})).await?;
        self.decode("list_servers", &r, |v| wire::list(v, wire::instance))
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        match self
            .call("delete_server", json!({"server_id": external_id}))
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        // A cloud may delete in the background: done once it is gone.
        while self.get_instance(external_id).await?.is_some() {
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        let r = self
            .call("console_log", json!({"server_id": external_id}))
            .await?;
        self.decode("console_log", &r, |v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("expected a string, found {v}"))
        })
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        // An upload takes as long as the image is big: its own timeout.
        let timeout = spec.timeout.max(self.program.timeout);
        let r = self
            .call_within(
                "upload_image",
                json!({"image": wire::upload(spec)}),
                timeout,
            )
            .await?;
        self.decode("upload_image", &r, |v| wire::string_field(v, "id"))
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        let r = self.call("list_images", json!({})).await?;
        self.decode("list_images", &r, |v| wire::list(v, wire::image))
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        match self
            .call("delete_image", json!({"image_id": external_id}))
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        let r = self
            .call("list_resources", json!({"kind": wire::kind_name(kind)}))
            .await?;
        self.decode("list_resources", &r, |v| {
            wire::list(v, |item| wire::resource(kind, item))
        })
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        match self
            .call(
                "delete_resource",
                json!({"kind": wire::kind_name(kind), "resource_id": id}),
            )
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn skip_nodescan(&self) -> bool {
        self.skip_nodescan.load(Ordering::Relaxed)
    }

    fn api_timeout(&self) -> Duration {
        self.program.timeout
    }
}
