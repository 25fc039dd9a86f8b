//! Layered settings: built-in defaults, then an optional TOML file, then environment
//! variables prefixed `VIDPIPE__` with `__` for nesting (`VIDPIPE__AMQP__URL`,
//! `VIDPIPE__WORKER__CONCURRENCY`). Every default works against a local RabbitMQ and
//! `./data`. A bad value is an error naming the key; the AMQP URL never prints its password.
//!
//! An unknown key is an error too, naming the key, where it came from and the nearest
//! valid one (`worker.concurency` → `worker.concurrency`): a typo must not run with the
//! default. The producer and both workers read the same file, so the valid keys are those
//! of every binary ([`KNOWN_KEYS`]): a worker does not object to another one's section.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::outcome::RetryPolicy;

/// Environment prefix; `VIDPIPE__SECTION__KEY` sets `section.key`.
pub const ENV_PREFIX: &str = "VIDPIPE";
/// Environment variable naming an optional settings file (same as `--config`).
pub const CONFIG_FILE_ENV: &str = "VIDPIPE_CONFIG";

/// All settings shared by the three binaries.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub topology: TopologySettings,
    pub retry: RetrySettings,
    pub worker: WorkerSettings,
    pub storage: StorageSettings,
    pub log: LogSettings,
    pub health: HealthSettings,
}

/// A value that must never appear in logs (`Debug` shows it redacted).
#[derive(Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself: only for handing to the library that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `amqp://user:pass@host/vhost` → `amqp://user:***@host/vhost`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://` or `amqps://`. Use [`Self::addresses`], which also covers
    /// [`Self::urls`].
    pub url: Secret,
    /// Several broker URLs (the nodes of a cluster), in place of `url`: connections go
    /// to the first live one, rotating through the list on loss. From the environment,
    /// comma separated. Setting both `url` and `urls` is an error.
    #[serde(deserialize_with = "url_list")]
    pub urls: Vec<Secret>,
    /// Longest wait for one connection attempt (TCP, TLS and the AMQP handshake): a
    /// frozen node accepts the TCP connection but never answers, and the next address
    /// must get its turn.
    pub connect_timeout_secs: f64,
    /// Longest wait between connection attempts while the broker is away.
    pub max_backoff_secs: f64,
    /// PEM file of the CA certificate(s) to trust for `amqps://`, in addition to the
    /// system's native roots (which alone are used when unset).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain) for `amqps://`; needs
    /// `tls_client_key_file`.
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1, not
    /// encrypted). Only its path is ever logged.
    pub tls_client_key_file: Option<PathBuf>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            urls: Vec::new(),
            connect_timeout_secs: 10.0,
            max_backoff_secs: 10.0,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }
}

impl AmqpSettings {
    /// The broker addresses to connect to, in order: `urls` when given, else `url`.
    /// Never empty (validation refuses an empty `urls`). Secrets: never log them
    /// unredacted.
    pub fn addresses(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.expose()]
        } else {
            self.urls.iter().map(Secret::expose).collect()
        }
    }

    /// The setting the addresses come from, for messages: `amqp.urls` or `amqp.url`.
    pub fn addresses_key(&self) -> &'static str {
        if self.urls.is_empty() {
            "amqp.url"
        } else {
            "amqp.urls"
        }
    }

    /// The addresses with their passwords hidden, comma separated, for messages.
    pub fn redacted_addresses(&self) -> String {
        self.addresses()
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks every address: `amqp://` or `amqps://`, and a URL lapin can parse. The
    /// error names the setting and the entry (1-based, for `urls`), with the password
    /// redacted; the parser's own words are kept only when they cannot hold the URL.
    pub fn validate_addresses(&self) -> anyhow::Result<()> {
        let many = !self.urls.is_empty();
        for (i, url) in self.addresses().into_iter().enumerate() {
            let which = if many {
                format!(
                    "invalid setting `amqp.urls`: entry {} ({})",
                    i + 1,
                    redact_url(url)
                )
            } else {
                format!("invalid setting `amqp.url` ({})", redact_url(url))
            };
            anyhow::ensure!(!url.trim().is_empty(), "{which}: empty");
            let lower = url.to_ascii_lowercase();
            anyhow::ensure!(
                lower.starts_with("amqp://") || lower.starts_with("amqps://"),
                "{which}: must start with amqp:// or amqps://"
            );
            if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                // The parser may quote its input (`Invalid URL: '…'`): say it without.
                let why = if e.contains(url) || e.contains('\'') || e.contains('@') {
                    "not a valid URL".to_owned()
                } else {
                    e
                };
                anyhow::bail!("{which}: {why}");
            }
        }
        anyhow::ensure!(
            self.connect_timeout_secs.is_finite() && self.connect_timeout_secs > 0.0,
            "invalid setting `amqp.connect_timeout_secs`: must be a positive number of seconds"
        );
        Ok(())
    }

    /// Checks the TLS files: each one given must exist and hold what it should, and a
    /// client certificate needs its key (and the other way round). Errors name the key.
    /// Key material never appears in an error.
    pub fn validate_tls(&self) -> anyhow::Result<()> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let read = |key: &str, path: &Path| -> anyhow::Result<Vec<u8>> {
            anyhow::ensure!(
                path.is_file(),
                "invalid setting `amqp.{key}`: {} does not exist",
                path.display()
            );
            std::fs::read(path).map_err(|e| {
                anyhow::anyhow!(
                    "invalid setting `amqp.{key}`: reading {}: {e}",
                    path.display()
                )
            })
        };
        let has_certificate = |pem: &[u8]| {
            CertificateDer::pem_slice_iter(pem)
                .next()
                .is_some_and(|c| c.is_ok())
        };
        if let Some(path) = &self.tls_ca_file {
            let pem = read("tls_ca_file", path)?;
            anyhow::ensure!(
                has_certificate(&pem),
                "invalid setting `amqp.tls_ca_file`: {} holds no PEM certificate",
                path.display()
            );
        }
        match (&self.tls_client_cert_file, &self.tls_client_key_file) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => anyhow::bail!(
                "invalid settings `amqp.tls_client_cert_file` and `amqp.tls_client_key_file`: \
                 give both or neither"
            ),
            (Some(cert), Some(key)) => {
                let pem = read("tls_client_cert_file", cert)?;
                anyhow::ensure!(
                    has_certificate(&pem),
                    "invalid setting `amqp.tls_client_cert_file`: {} holds no PEM certificate",
                    cert.display()
                );
                let pem = read("tls_client_key_file", key)?;
                anyhow::ensure!(
                    PrivateKeyDer::from_pem_slice(&pem).is_ok(),
                    "invalid setting `amqp.tls_client_key_file`: {} holds no unencrypted PEM \
                     private key",
                    key.display()
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct TopologySettings {
    /// Prepended to every exchange and queue name (tests use a unique one). Empty by
    /// default, so the names are exactly `video_tasks`, `video_tasks.transcode`, ….
    pub prefix: String,
    /// Declare the topology at start. Turn off for least-privilege users that may not
    /// configure anything; an administrator declares it once instead
    /// (`transcoder --declare-topology`), and processes only check it exists.
    pub declare: bool,
}

impl Default for TopologySettings {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            declare: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff of each retry tier in seconds; retries past the last tier reuse it.
    /// One number (`60`) is a one-tier list.
    #[serde(deserialize_with = "seconds_list")]
    pub delays_secs: Vec<f64>,
    /// Quorum-queue delivery limit: a message redelivered this often (worker crash loop)
    /// is dead-lettered by the broker itself.
    pub delivery_limit: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            delays_secs: vec![5.0, 30.0, 300.0],
            delivery_limit: 20,
        }
    }
}

/// A list of seconds given as a list (`[5, 30]`, from a file), a comma-separated
/// string (`5, 30`, from the environment) or a single number (`60`: the environment
/// source reads a lone number as a number, not as a list of one).
fn seconds_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    d.deserialize_any(Seconds)
}

/// Visits any of [`seconds_list`]'s forms. List items go through it again, since the
/// environment source hands them over as untrimmed strings (`" 30"`).
struct Seconds;

impl<'de> serde::de::Visitor<'de> for Seconds {
    type Value = Vec<f64>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("seconds, e.g. [5, 30, 300] or \"5,30,300\"")
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(vec![v as f64])
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(vec![v as f64])
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(vec![v])
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        v.split(',')
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| E::custom(format!("`{}` is not a number of seconds", s.trim())))
            })
            .collect()
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(Seconds)? {
            out.extend(item);
        }
        Ok(out)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Seconds {
    type Value = Vec<f64>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A list of broker URLs given as a list (from a file) or a comma-separated string
/// (from the environment, which also hands a list over as untrimmed strings). Entries
/// are trimmed; an empty one is kept, so validation can name it.
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    d.deserialize_any(Urls)
}

/// Visits any of [`url_list`]'s forms. Errors never quote a value (it holds passwords).
struct Urls;

impl<'de> serde::de::Visitor<'de> for Urls {
    type Value = Vec<Secret>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(
            "broker URLs, e.g. [\"amqp://a:5672\", \"amqp://b:5672\"] or \"amqp://a,amqp://b\"",
        )
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.split(',').map(|s| Secret::new(s.trim())).collect())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(Urls)? {
            out.extend(item);
        }
        Ok(out)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Urls {
    type Value = Vec<Secret>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl RetrySettings {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            delays: self
                .delays_secs
                .iter()
                .map(|s| Duration::from_secs_f64(*s))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct WorkerSettings {
    /// Jobs run at once, and the prefetch count. Unset: the worker's own default
    /// (transcoder 1, thumbnailer 2).
    pub concurrency: Option<u16>,
    /// A job running longer is cancelled and retried. Keep it below the broker's
    /// `consumer_timeout` (30 min by default).
    pub job_timeout_secs: f64,
    /// On SIGTERM, how long in-flight jobs may run before they are cancelled and requeued.
    pub shutdown_grace_secs: f64,
    /// Name in logs, events and dead-letter headers. Default: `<hostname>-<pid>`.
    pub name: Option<String>,
    /// Where jobs get their scratch directories.
    pub scratch_dir: PathBuf,
    /// A job still running after this long gets its `started` event; a shorter one goes
    /// from queued to its outcome without it. Every event is a message the broker routes,
    /// and most of a small job's broker cost was this one: nothing that follows jobs
    /// (`--wait`, `status`) needs it. 0 announces every job at once.
    pub started_event_after_secs: f64,
    /// How often a worker announces itself on `video_events` (the worker registry).
    pub heartbeat_secs: f64,
    /// `producer workers` shows a worker silent for longer than this as gone. Keep it a
    /// few heartbeats long: one lost announcement must not make a worker look gone.
    pub gone_after_secs: f64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: None,
            job_timeout_secs: 1500.0,
            shutdown_grace_secs: 60.0,
            name: None,
            scratch_dir: std::env::temp_dir().join("vidpipe-scratch"),
            started_event_after_secs: 0.5,
            heartbeat_secs: 5.0,
            gone_after_secs: 15.0,
        }
    }
}

impl WorkerSettings {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Which object store holds the media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(test, derive(Serialize))]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// A directory (`storage.root`), shared by volume between containers on one host.
    #[default]
    Local,
    /// S3-compatible object storage (`storage.s3.*`), for workers on many machines.
    S3,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct StorageSettings {
    pub backend: StorageBackend,
    /// Root directory of the local filesystem store.
    pub root: PathBuf,
    /// Bytes an upload buffers in memory before sending a part (multipart above it).
    /// S3 needs at least 5 MiB.
    pub upload_buffer_bytes: usize,
    pub s3: S3Settings,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            root: PathBuf::from("./data"),
            upload_buffer_bytes: 8 << 20,
            s3: S3Settings::default(),
        }
    }
}

/// S3-compatible storage. Unset credentials and region fall back to the standard
/// `AWS_*` environment variables.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct S3Settings {
    pub bucket: String,
    /// e.g. `http://minio:9000`; unset means AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as MinIO and most self-hosted servers want.
    pub path_style: bool,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Retries inside one storage call before the job itself fails (and is retried).
    pub max_retries: usize,
    pub retry_timeout_secs: f64,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
            max_retries: 3,
            retry_timeout_secs: 20.0,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(test, derive(Serialize))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `info,lapin=warn`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info,lapin=warn".into(),
        }
    }
}

/// The health and metrics endpoint (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(default)]
pub struct HealthSettings {
    /// Whether to serve the endpoint at all.
    pub enabled: bool,
    /// `ip:port` to listen on. The default, `127.0.0.1:0`, is loopback only on a port the
    /// OS picks (logged at start): nothing outside the machine can reach it, and any
    /// number of workers start side by side. Containers set `0.0.0.0:8080`.
    pub addr: String,
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Seconds a client gets to send its request and receive the answer.
    pub timeout_secs: f64,
    /// `health.port` and `health.bind` were replaced by `addr`: still parsed, only so a
    /// deployment that sets them gets an error saying what to write instead of a
    /// silently different address.
    #[serde(rename = "port")]
    #[cfg_attr(test, serde(skip_serializing))]
    retired_port: Option<serde::de::IgnoredAny>,
    #[serde(rename = "bind")]
    #[cfg_attr(test, serde(skip_serializing))]
    retired_bind: Option<serde::de::IgnoredAny>,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: "127.0.0.1:0".into(),
            max_connections: 64,
            timeout_secs: 5.0,
            retired_port: None,
            retired_bind: None,
        }
    }
}

impl HealthSettings {
    /// [`Self::addr`] parsed; the error names the key.
    pub fn socket_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.addr.parse().map_err(|_| {
            anyhow::anyhow!(
                "invalid setting `health.addr`: `{}` is not an ip:port such as 127.0.0.1:0 or 0.0.0.0:8080",
                self.addr.chars().take(100).collect::<String>()
            )
        })
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (key, set) in [
            ("port", self.retired_port.is_some()),
            ("bind", self.retired_bind.is_some()),
        ] {
            anyhow::ensure!(
                !set,
                "setting `health.{key}` was replaced by `health.addr` (ip:port, e.g. \
                 VIDPIPE__HEALTH__ADDR=0.0.0.0:8080; port 0 lets the OS pick one); \
                 `health.enabled = false` turns the endpoint off"
            );
        }
        self.socket_addr()?;
        anyhow::ensure!(
            (1..=65_536).contains(&self.max_connections),
            "invalid setting `health.max_connections`: must be 1 to 65536"
        );
        anyhow::ensure!(
            self.timeout_secs.is_finite() && self.timeout_secs > 0.0,
            "invalid setting `health.timeout_secs`: must be a positive number of seconds"
        );
        Ok(())
    }
}

/// Settings plus the raw layered source, for worker-specific sections.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    raw: config::Config,
}

impl Loaded {
    /// A worker-specific section such as `transcoder` or `limits`; missing keys take
    /// the type's defaults.
    pub fn section<T: DeserializeOwned + Default>(&self, key: &str) -> anyhow::Result<T> {
        match self.raw.get::<T>(key) {
            Ok(v) => Ok(v),
            Err(config::ConfigError::NotFound(_)) => Ok(T::default()),
            Err(e) => Err(anyhow::anyhow!("invalid setting in `{key}`: {e}")),
        }
    }
}

/// Every valid setting of every vidpipe binary, as dotted keys. The producer and the
/// workers load the same file and environment, so each accepts the others' sections
/// (`thumbnailer.*` in the transcoder, `media.*` in the producer). Unit tests hold this
/// list to the settings structs: the shared ones here, `transcoder.*` and
/// `thumbnailer.*` in their crates, `media.*` in `media::probe`.
pub const KNOWN_KEYS: &[&str] = &[
    "amqp.url",
    "amqp.urls",
    "amqp.connect_timeout_secs",
    "amqp.max_backoff_secs",
    "amqp.tls_ca_file",
    "amqp.tls_client_cert_file",
    "amqp.tls_client_key_file",
    "topology.prefix",
    "topology.declare",
    "retry.max_attempts",
    "retry.delays_secs",
    "retry.delivery_limit",
    "worker.concurrency",
    "worker.job_timeout_secs",
    "worker.shutdown_grace_secs",
    "worker.name",
    "worker.scratch_dir",
    "worker.started_event_after_secs",
    "worker.heartbeat_secs",
    "worker.gone_after_secs",
    "storage.backend",
    "storage.root",
    "storage.upload_buffer_bytes",
    "storage.s3.bucket",
    "storage.s3.endpoint",
    "storage.s3.region",
    "storage.s3.path_style",
    "storage.s3.allow_http",
    "storage.s3.access_key_id",
    "storage.s3.secret_access_key",
    "storage.s3.max_retries",
    "storage.s3.retry_timeout_secs",
    "log.format",
    "log.level",
    "health.enabled",
    "health.addr",
    "health.max_connections",
    "health.timeout_secs",
    // Retired: still recognised, so that validation says what replaced them.
    "health.port",
    "health.bind",
    // The workers' media limits (`shared::media::MediaLimits`).
    "media.max_duration_s",
    "media.max_width",
    "media.max_height",
    "media.max_file_bytes",
    "media.max_streams",
    "media.max_pixel_aspect",
    // The transcoder's own section (`transcoder::TranscoderSettings`).
    "transcoder.preset",
    "transcoder.crf",
    "transcoder.keyframe_interval_s",
    "transcoder.hls_segment_s",
    "transcoder.threads",
    "transcoder.audio_sample_rate",
    "transcoder.segment_threshold_secs",
    "transcoder.segment_secs",
    "transcoder.fit_target_ssim",
    "transcoder.fit_crf_min",
    "transcoder.fit_crf_max",
    "transcoder.fit_samples",
    "transcoder.fit_sample_secs",
    "transcoder.fit_max_share",
    "transcoder.fit_max_cap_ratio",
    "transcoder.fit_min_gain_db",
    "transcoder.hevc_preset",
    "transcoder.av1_preset",
    // The thumbnailer's own section (`thumbnailer::ThumbnailerSettings`).
    "thumbnailer.threads",
    "thumbnailer.max_sheet_height",
    "thumbnailer.poster_candidates",
];

/// The dotted keys of every value in a settings tree (tables are walked, not listed),
/// each with where it came from (`config`'s origin: a file path or "the environment").
fn leaf_keys(
    prefix: &str,
    table: &config::Map<String, config::Value>,
    out: &mut Vec<(String, Option<String>)>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            config::ValueKind::Table(inner) => leaf_keys(&key, inner, out),
            _ => out.push((key, value.origin().map(str::to_owned))),
        }
    }
}

/// The setting a `VIDPIPE__…` variable sets, as `config`'s environment source maps it
/// (lower case, prefix dropped, `__` → `.`); `None` for other variables, such as the
/// compose file's `VIDPIPE_MEDIA` (one underscore: not a setting).
fn env_var_key(var: &str) -> Option<String> {
    let lower = var.to_lowercase();
    let rest = lower.strip_prefix(&format!("{}__", ENV_PREFIX.to_lowercase()))?;
    Some(rest.replace("__", "."))
}

/// Edit distance with adjacent transpositions counted as one edit (`wroker` is one
/// edit from `worker`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The valid key an unknown one most likely meant: one with the same last part in
/// another section (`worker.prefix` → `topology.prefix`, `wroker.concurrency` →
/// `worker.concurrency`), else the closest by spelling (a few edits at most).
fn nearest_key(unknown: &str) -> Option<&'static str> {
    let last = unknown.rsplit('.').next().unwrap_or(unknown);
    let same_last_part = KNOWN_KEYS
        .iter()
        .filter(|k| k.rsplit('.').next() == Some(last))
        .min_by_key(|k| edit_distance(unknown, k));
    let limit = (unknown.len() / 4).max(2);
    let by_spelling = || {
        KNOWN_KEYS
            .iter()
            .map(|k| (edit_distance(unknown, k), k))
            .filter(|(d, _)| *d <= limit)
            .min_by_key(|(d, _)| *d)
            .map(|(_, k)| k)
    };
    same_last_part.or_else(by_spelling).copied()
}

/// Every key in `raw` that no binary reads, as one error naming each key, where it was
/// set and the nearest valid key. `file` and `env` are what `raw` was read from (`env`
/// `None`: the process's own environment), to name the file or variable behind a key.
fn check_unknown_keys(
    raw: &config::Config,
    file: Option<&Path>,
    env: Option<&config::Map<String, String>>,
) -> anyhow::Result<()> {
    let table = config::Source::collect(raw).context("reading settings")?;
    let mut leaves = Vec::new();
    leaf_keys("", &table, &mut leaves);
    let var_for = |key: &str| -> Option<String> {
        let matches = |var: &str| env_var_key(var).as_deref() == Some(key);
        match env {
            Some(map) => map.keys().find(|v| matches(v)).cloned(),
            None => std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .find(|v| matches(v)),
        }
    };
    let mut problems = Vec::new();
    for (key, origin) in leaves {
        // A section given a plain value (`VIDPIPE__STORAGE__S3=x`) is not a typo:
        // deserialising says what is wrong with it.
        let is_section = KNOWN_KEYS.iter().any(|k| {
            k.strip_prefix(key.as_str())
                .is_some_and(|r| r.starts_with('.'))
        });
        if KNOWN_KEYS.contains(&key.as_str()) || is_section {
            continue;
        }
        let from = match origin.as_deref() {
            Some("the environment") => var_for(&key).unwrap_or_else(|| "the environment".into()),
            // `config` records the path relative to the working directory; say it as given.
            _ => file.map_or_else(|| "the settings".into(), |f| f.display().to_string()),
        };
        let mut problem = format!("unknown setting `{key}` (from {from})");
        if let Some(near) = nearest_key(&key) {
            problem.push_str(&format!("; did you mean `{near}`?"));
        }
        problems.push(problem);
    }
    problems.sort();
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// Loads settings: defaults, then `file` (or `$VIDPIPE_CONFIG`) if given, then the
/// environment.
pub fn load(file: Option<&Path>) -> anyhow::Result<Loaded> {
    load_with_env(file, None)
}

/// [`load`] with the environment given as a map (`None`: the process's own), so tests
/// need not change the process environment other tests read.
fn load_with_env(
    file: Option<&Path>,
    env: Option<config::Map<String, String>>,
) -> anyhow::Result<Loaded> {
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
    let mut builder = config::Config::builder();
    if let Some(file) = &file {
        anyhow::ensure!(
            file.is_file(),
            "settings file {} does not exist",
            file.display()
        );
        builder =
            builder.add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("retry.delays_secs")
            .with_list_parse_key("amqp.urls")
            .source(env.clone()),
    );
    let raw = builder.build().context("reading settings")?;
    check_unknown_keys(&raw, file.as_deref(), env.as_ref())?;
    anyhow::ensure!(
        !(is_set(&raw, "amqp.url") && is_set(&raw, "amqp.urls")),
        "settings `amqp.url` and `amqp.urls` are both set: give one (`amqp.urls` lists \
         every broker node, `amqp.url` is one broker)"
    );
    let settings: Settings = raw
        .clone()
        .try_deserialize()
        .map_err(|e| anyhow::anyhow!("invalid setting: {e}"))?;
    anyhow::ensure!(
        !(is_set(&raw, "amqp.urls") && settings.amqp.urls.is_empty()),
        "invalid setting `amqp.urls`: the list is empty; give at least one broker URL"
    );
    validate(&settings)?;
    Ok(Loaded { settings, raw })
}

/// Whether a file or the environment gave `key` (defaults are not in `raw`).
fn is_set(raw: &config::Config, key: &str) -> bool {
    raw.get::<serde::de::IgnoredAny>(key).is_ok()
}

fn validate(s: &Settings) -> anyhow::Result<()> {
    s.amqp.validate_addresses()?;
    s.amqp.validate_tls()?;
    if s.storage.backend == StorageBackend::S3 {
        anyhow::ensure!(
            !s.storage.s3.bucket.is_empty(),
            "invalid setting `storage.s3.bucket`: required when `storage.backend` is `s3`"
        );
        anyhow::ensure!(
            s.storage.upload_buffer_bytes >= 5 << 20,
            "invalid setting `storage.upload_buffer_bytes`: S3 parts must be at least 5 MiB (5242880)"
        );
    }
    anyhow::ensure!(
        s.storage.upload_buffer_bytes >= 64 << 10,
        "invalid setting `storage.upload_buffer_bytes`: at least 65536"
    );
    anyhow::ensure!(
        s.retry.max_attempts >= 1,
        "invalid setting `retry.max_attempts`: must be at least 1"
    );
    anyhow::ensure!(
        s.retry
            .delays_secs
            .iter()
            .all(|d| d.is_finite() && *d > 0.0),
        "invalid setting `retry.delays_secs`: every delay must be a positive number of seconds"
    );
    anyhow::ensure!(
        s.worker.concurrency != Some(0),
        "invalid setting `worker.concurrency`: must be at least 1"
    );
    anyhow::ensure!(
        s.worker.job_timeout_secs.is_finite() && s.worker.job_timeout_secs > 0.0,
        "invalid setting `worker.job_timeout_secs`: must be a positive number"
    );
    anyhow::ensure!(
        s.worker.shutdown_grace_secs.is_finite() && s.worker.shutdown_grace_secs >= 0.0,
        "invalid setting `worker.shutdown_grace_secs`: must be zero or more"
    );
    anyhow::ensure!(
        s.worker.started_event_after_secs.is_finite() && s.worker.started_event_after_secs >= 0.0,
        "invalid setting `worker.started_event_after_secs`: must be zero or more"
    );
    anyhow::ensure!(
        s.worker.heartbeat_secs.is_finite() && s.worker.heartbeat_secs >= 0.1,
        "invalid setting `worker.heartbeat_secs`: must be at least 0.1 seconds"
    );
    anyhow::ensure!(
        s.worker.gone_after_secs.is_finite() && s.worker.gone_after_secs > s.worker.heartbeat_secs,
        "invalid setting `worker.gone_after_secs`: must be longer than `worker.heartbeat_secs`"
    );
    s.health.validate()?;
    anyhow::ensure!(
        s.topology
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "invalid setting `topology.prefix`: only A-Z, a-z, 0-9, `.`, `_` and `-`"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_locally() {
        let s = Settings::default();
        assert_eq!(s.amqp.url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.storage.root, PathBuf::from("./data"));
        assert_eq!(s.topology.prefix, "");
        validate(&s).unwrap();
    }

    #[test]
    fn debug_never_shows_the_password() {
        let s = AmqpSettings {
            url: Secret::new("amqp://app:hunter2@broker:5672/%2f"),
            max_backoff_secs: 1.0,
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@broker"), "{shown}");
    }

    #[test]
    fn file_values_override_defaults_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "[worker]\nconcurrency = 3\n[retry]\ndelays_secs = [1, 2]\n",
        )
        .unwrap();
        let loaded = load(Some(&good)).unwrap();
        assert_eq!(loaded.settings.worker.concurrency, Some(3));
        assert_eq!(loaded.settings.retry.delays_secs, vec![1.0, 2.0]);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[worker]\nconcurrency = \"lots\"\n").unwrap();
        let err = format!("{:#}", load(Some(&bad)).unwrap_err());
        assert!(err.contains("concurrency"), "{err}");

        let zero = dir.path().join("zero.toml");
        std::fs::write(&zero, "[worker]\nconcurrency = 0\n").unwrap();
        let err = format!("{:#}", load(Some(&zero)).unwrap_err());
        assert!(err.contains("worker.concurrency"), "{err}");
    }

    #[test]
    fn tls_files_must_exist_and_come_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        // Any DER-ish base64 parses as a PEM certificate; contents are checked by rustls.
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        let with = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| AmqpSettings {
            tls_ca_file: ca.map(Path::to_path_buf),
            tls_client_cert_file: cert.map(Path::to_path_buf),
            tls_client_key_file: key.map(Path::to_path_buf),
            ..Default::default()
        };

        with(Some(&pem), Some(&pem), Some(&key))
            .validate_tls()
            .unwrap();
        let err = with(Some(&missing), None, None)
            .validate_tls()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("amqp.tls_ca_file") && err.contains("missing.pem"),
            "{err}"
        );
        let err = with(None, Some(&pem), Some(&missing))
            .validate_tls()
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.tls_client_key_file"), "{err}");
        for (cert, key) in [(Some(pem.as_path()), None), (None, Some(key.as_path()))] {
            let err = with(None, cert, key)
                .validate_tls()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("amqp.tls_client_cert_file")
                    && err.contains("amqp.tls_client_key_file"),
                "{err}"
            );
        }
        let err = with(None, Some(&key), Some(&key))
            .validate_tls()
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.tls_client_cert_file"), "{err}");
        let err = with(None, Some(&pem), Some(&pem))
            .validate_tls()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("amqp.tls_client_key_file") && !err.contains("MAA="),
            "{err}"
        );
    }

    #[test]
    fn retry_delays_from_the_environment_take_one_value_or_a_list() {
        let env = |v: &str| {
            let mut m = config::Map::new();
            m.insert("VIDPIPE__RETRY__DELAYS_SECS".to_owned(), v.to_owned());
            load_with_env(None, Some(m))
        };
        assert_eq!(env("60").unwrap().settings.retry.delays_secs, vec![60.0]);
        assert_eq!(env("2.5").unwrap().settings.retry.delays_secs, vec![2.5]);
        assert_eq!(
            env("5,30,300").unwrap().settings.retry.delays_secs,
            vec![5.0, 30.0, 300.0]
        );
        assert_eq!(
            env("0.5, 10").unwrap().settings.retry.delays_secs,
            vec![0.5, 10.0]
        );
        let err = format!("{:#}", env("5,soon").unwrap_err());
        assert!(err.contains("soon"), "{err}");
        let err = format!("{:#}", env("-1").unwrap_err());
        assert!(err.contains("retry.delays_secs"), "{err}");
    }

    #[test]
    fn health_listens_on_loopback_by_default_and_retired_keys_say_what_replaced_them() {
        let env = |pairs: &[(&str, &str)]| {
            let map = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            load_with_env(None, Some(map))
        };
        let defaults = env(&[]).unwrap().settings.health;
        let addr = defaults.socket_addr().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 0, "the OS picks the port");
        assert!(defaults.enabled);

        let set = env(&[("VIDPIPE__HEALTH__ADDR", "0.0.0.0:8080")]).unwrap();
        assert_eq!(set.settings.health.socket_addr().unwrap().port(), 8080);

        for key in ["VIDPIPE__HEALTH__PORT", "VIDPIPE__HEALTH__BIND"] {
            let err = format!("{:#}", env(&[(key, "8080")]).unwrap_err());
            assert!(err.contains("replaced by `health.addr`"), "{err}");
        }
        let err = format!(
            "{:#}",
            env(&[("VIDPIPE__HEALTH__ADDR", "localhost")]).unwrap_err()
        );
        assert!(err.contains("health.addr"), "{err}");
        for (key, value) in [
            ("VIDPIPE__HEALTH__MAX_CONNECTIONS", "0"),
            ("VIDPIPE__HEALTH__MAX_CONNECTIONS", "100000000000"),
            ("VIDPIPE__HEALTH__TIMEOUT_SECS", "0"),
        ] {
            let err = format!("{:#}", env(&[(key, value)]).unwrap_err());
            assert!(err.contains("health."), "{key}={value}: {err}");
        }
    }

    /// Dotted keys of every leaf of a serialised settings tree.
    fn json_keys(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (name, inner) in map {
                    let key = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    json_keys(&key, inner, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }

    #[test]
    fn known_keys_are_exactly_the_shared_settings_plus_other_sections() {
        let mut from_structs = Vec::new();
        json_keys(
            "",
            &serde_json::to_value(Settings::default()).unwrap(),
            &mut from_structs,
        );
        from_structs.extend(["health.port".into(), "health.bind".into()]);
        from_structs.sort();
        let other_sections = ["media.", "transcoder.", "thumbnailer."];
        let mut listed: Vec<String> = KNOWN_KEYS
            .iter()
            .filter(|k| !other_sections.iter().any(|s| k.starts_with(s)))
            .map(|k| (*k).to_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, from_structs);
    }

    fn env_map(pairs: &[(&str, &str)]) -> config::Map<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_misspelled_environment_variable_is_an_error_naming_it_and_the_nearest_key() {
        let err = load_with_env(None, Some(env_map(&[("VIDPIPE__WORKER__CONCURENCY", "4")])))
            .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "unknown setting `worker.concurency` (from VIDPIPE__WORKER__CONCURENCY); \
             did you mean `worker.concurrency`?"
        );
        let err = load_with_env(None, Some(env_map(&[("VIDPIPE__WORKER__PREFIX", "x")])))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `topology.prefix`?"), "{err}");
        let err = load_with_env(None, Some(env_map(&[("VIDPIPE__NONSENSE", "x")])))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "unknown setting `nonsense` (from VIDPIPE__NONSENSE)");
    }

    #[test]
    fn a_misspelled_file_section_is_an_error_naming_the_file_and_the_nearest_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vidpipe.toml");
        std::fs::write(&file, "[wroker]\nconcurrency = 4\n").unwrap();
        let err = format!(
            "{:#}",
            load_with_env(Some(&file), Some(env_map(&[]))).unwrap_err()
        );
        assert_eq!(
            err,
            format!(
                "unknown setting `wroker.concurrency` (from {}); did you mean `worker.concurrency`?",
                file.display()
            )
        );
    }

    #[test]
    fn other_binaries_sections_and_compose_variables_are_not_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vidpipe.toml");
        std::fs::write(
            &file,
            "[transcoder]\npreset = \"fast\"\n[thumbnailer]\nmax_sheet_height = 2048\n\
             [media]\nmax_width = 1920\n[storage.s3]\nregion = \"x\"\n",
        )
        .unwrap();
        let env = env_map(&[
            ("VIDPIPE_MEDIA", "./media"),
            ("VIDPIPE_TRANSCODER_CONCURRENCY", "2"),
            ("VIDPIPE_CONFIG", "/elsewhere.toml"),
            ("VIDPIPE__THUMBNAILER__POSTER_CANDIDATES", "3"),
            ("VIDPIPE__WORKER__CONCURRENCY", "2"),
        ]);
        let loaded = load_with_env(Some(&file), Some(env)).unwrap();
        assert_eq!(loaded.settings.worker.concurrency, Some(2));
    }

    #[test]
    fn nearest_key_is_close_in_spelling_or_shares_the_last_part() {
        assert_eq!(
            nearest_key("wroker.concurrency"),
            Some("worker.concurrency")
        );
        assert_eq!(nearest_key("amqp.uri"), Some("amqp.url"));
        assert_eq!(nearest_key("log.formt"), Some("log.format"));
        assert_eq!(nearest_key("storage.bucket"), Some("storage.s3.bucket"));
        assert_eq!(nearest_key("completely.different"), None);
        assert_eq!(edit_distance("wroker", "worker"), 1);
    }

    #[test]
    fn broker_urls_come_as_a_list_or_comma_separated_and_replace_the_url() {
        let env = |pairs: &[(&str, &str)]| load_with_env(None, Some(env_map(pairs)));
        let loaded = env(&[(
            "VIDPIPE__AMQP__URLS",
            "amqp://a:1/%2f, amqp://u:pw@b:2/%2f ,amqps://c:3/%2f",
        )])
        .unwrap();
        assert_eq!(
            loaded.settings.amqp.addresses(),
            ["amqp://a:1/%2f", "amqp://u:pw@b:2/%2f", "amqps://c:3/%2f"]
        );
        assert_eq!(loaded.settings.amqp.addresses_key(), "amqp.urls");
        let one = env(&[("VIDPIPE__AMQP__URLS", "amqp://a:1/%2f")]).unwrap();
        assert_eq!(one.settings.amqp.addresses(), ["amqp://a:1/%2f"]);
        let default = env(&[]).unwrap();
        assert_eq!(
            default.settings.amqp.addresses(),
            ["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );
        assert_eq!(default.settings.amqp.addresses_key(), "amqp.url");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vidpipe.toml");
        std::fs::write(
            &file,
            "[amqp]\nurls = [\"amqp://a/%2f\", \"amqp://b/%2f\"]\n",
        )
        .unwrap();
        let loaded = load_with_env(Some(&file), Some(env_map(&[]))).unwrap();
        assert_eq!(
            loaded.settings.amqp.addresses(),
            ["amqp://a/%2f", "amqp://b/%2f"]
        );
        std::fs::write(&file, "[amqp]\nurls = []\n").unwrap();
        let err = format!(
            "{:#}",
            load_with_env(Some(&file), Some(env_map(&[]))).unwrap_err()
        );
        assert!(
            err.contains("`amqp.urls`") && err.contains("empty"),
            "{err}"
        );

        let err = format!(
            "{:#}",
            env(&[
                ("VIDPIPE__AMQP__URL", "amqp://a/%2f"),
                ("VIDPIPE__AMQP__URLS", "amqp://b/%2f"),
            ])
            .unwrap_err()
        );
        assert!(
            err.contains("`amqp.url` and `amqp.urls` are both set"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_broker_url_is_named_by_its_place_in_the_list_without_its_password() {
        let env = |list: &str| {
            format!(
                "{:#}",
                load_with_env(None, Some(env_map(&[("VIDPIPE__AMQP__URLS", list)]))).unwrap_err()
            )
        };
        let err = env("amqp://a/%2f,http://app:hunter2@b:5672/");
        assert!(
            err.contains("`amqp.urls`: entry 2 (http://app:***@b:5672/)"),
            "{err}"
        );
        assert!(
            err.contains("amqp:// or amqps://") && !err.contains("hunter2"),
            "{err}"
        );
        let err = env("amqp://app:hunter2@b:99999/%2f,amqp://a/%2f");
        assert!(err.contains("entry 1") && !err.contains("hunter2"), "{err}");
        let err = env("amqp://a/%2f,,amqp://b/%2f");
        assert!(err.contains("entry 2") && err.contains("empty"), "{err}");
        let err = env("amqp://a/%2f,amqp://app:hunter2@b:1/%2f?heartbeat=soon");
        assert!(err.contains("entry 2") && !err.contains("hunter2"), "{err}");
        let single = format!(
            "{:#}",
            load_with_env(
                None,
                Some(env_map(&[("VIDPIPE__AMQP__URL", "http://app:hunter2@b/")]))
            )
            .unwrap_err()
        );
        assert!(
            single.contains("`amqp.url` (http://app:***@b/)"),
            "{single}"
        );
    }

    #[test]
    fn missing_settings_file_is_an_error() {
        let err = load(Some(Path::new("/nonexistent/vidpipe.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vidpipe.toml"));
    }
}
