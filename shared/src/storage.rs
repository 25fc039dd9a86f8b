//! Media storage behind one small interface, on `object_store` (local filesystem by
//! default, rooted at `storage.root`).
//!
//! - Reads and writes stream; a whole video is never held in memory.
//! - Every object becomes visible only when complete (the filesystem store writes a
//!   staging file and renames it).
//! - A task's outputs are committed file by file, then its `manifest.json` last, written
//!   with create-if-absent: the manifest's presence means "this task is done", and two
//!   workers racing on the same task cannot both claim it.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::handler::TaskOutput;
use crate::outcome::JobError;
use crate::settings::{StorageBackend, StorageSettings};
use crate::storage_key::StorageKey;

/// Name of the per-task completion record under its output prefix.
pub const MANIFEST: &str = "manifest.json";

/// Copy buffer for streaming files in and out.
const CHUNK: usize = 1 << 20;

/// The media store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Set for the filesystem backend: lets workers read sources in place.
    local: Option<Arc<LocalFileSystem>>,
    /// Canonical root of the filesystem backend (empty for S3).
    root: PathBuf,
    /// In-memory buffer of a streamed upload; multipart above it.
    upload_buffer: usize,
}

/// A source made available as a local file.
#[derive(Debug)]
pub struct LocalSource {
    pub path: PathBuf,
    pub size: u64,
}

impl Storage {
    /// Opens the store the settings name (`storage.backend`).
    pub fn from_settings(settings: &StorageSettings) -> anyhow::Result<Self> {
        match settings.backend {
            StorageBackend::Local => Self::local(settings),
            StorageBackend::S3 => Self::s3(settings),
        }
    }

    /// The filesystem store under `storage.root`, created if needed.
    fn local(settings: &StorageSettings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.root).with_context(|| {
            format!(
                "creating storage root {} (setting `storage.root`)",
                settings.root.display()
            )
        })?;
        let root = settings
            .root
            .canonicalize()
            .with_context(|| format!("resolving storage root {}", settings.root.display()))?;
        let local = Arc::new(
            LocalFileSystem::new_with_prefix(&root)
                .context("opening the storage root")?
                .with_automatic_cleanup(true),
        );
        Ok(Self {
            store: local.clone(),
            local: Some(local),
            root,
            upload_buffer: settings.upload_buffer_bytes,
        })
    }

    /// An S3-compatible bucket. Settings win over the standard `AWS_*` variables.
    fn s3(settings: &StorageSettings) -> anyhow::Result<Self> {
        // reqwest's rustls has no built-in crypto provider here (ring, not aws-lc-rs):
        // install ring once per process. A second install is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = &settings.s3;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&s3.bucket)
            .with_virtual_hosted_style_request(!s3.path_style)
            .with_retry(RetryConfig {
                max_retries: s3.max_retries,
                retry_timeout: Duration::from_secs_f64(s3.retry_timeout_secs),
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            )
            // After the client options: they hold this flag and would reset it.
            .with_allow_http(s3.allow_http);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &s3.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &s3.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &s3.secret_access_key {
            builder = builder.with_secret_access_key(secret.expose());
        }
        let store = builder.build().with_context(|| {
            format!(
                "configuring S3 bucket `{}` (settings `storage.s3.*`)",
                s3.bucket
            )
        })?;
        Ok(Self {
            store: Arc::new(store),
            local: None,
            root: PathBuf::new(),
            upload_buffer: settings.upload_buffer_bytes,
        })
    }

    fn path(key: &StorageKey) -> ObjectPath {
        ObjectPath::from(key.as_str().trim_end_matches('/'))
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &StorageKey) -> anyhow::Result<bool> {
        match self.store.head(&Self::path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("checking `{key}` in storage")),
        }
    }

    /// Streams a local file into storage under `key`, calling `progress` with the bytes
    /// sent so far. The object appears only once complete.
    pub async fn put_file(
        &self,
        key: &StorageKey,
        file: &FsPath,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> anyhow::Result<u64> {
        let mut input = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let mut writer = object_store::buffered::BufWriter::with_capacity(
            self.store.clone(),
            Self::path(key),
            self.upload_buffer,
        );
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        loop {
            let n = input
                .read(&mut buf)
                .await
                .with_context(|| format!("reading {}", file.display()))?;
            if n == 0 {
                break;
            }
            writer
                .write_all(&buf[..n])
                .await
                .with_context(|| format!("writing `{key}` to storage"))?;
            sent += n as u64;
            progress(sent);
        }
        writer
            .shutdown()
            .await
            .with_context(|| format!("completing `{key}` in storage"))?;
        Ok(sent)
    }

    /// Writes a small object (manifests, test fixtures) in one go.
    pub async fn put_bytes(&self, key: &StorageKey, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.store
            .put(&Self::path(key), PutPayload::from(bytes))
            .await
            .with_context(|| format!("writing `{key}` to storage"))?;
        Ok(())
    }

    /// Reads a small object whole; `None` if absent.
    pub async fn get_bytes(&self, key: &StorageKey) -> anyhow::Result<Option<Vec<u8>>> {
        match self.store.get(&Self::path(key)).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .with_context(|| format!("reading `{key}`"))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading `{key}` from storage")),
        }
    }

    /// Makes the source available as a local file. The filesystem backend reads it in
    /// place (after checking it really lies inside the root: no symlink escapes); other
    /// backends stream it into `scratch` (bounded disk use: one copy, removed with the
    /// scratch directory). Missing source, no bucket, access denied → permanent; other
    /// trouble (timeouts, throttling, 5xx) → transient.
    pub async fn fetch(&self, key: &StorageKey, scratch: &FsPath) -> Result<LocalSource, JobError> {
        let location = Self::path(key);
        let what = format!("source `{key}`");
        let meta = self
            .store
            .head(&location)
            .await
            .map_err(|e| classify(&what, e))?;
        if let Some(local) = &self.local {
            let path = local
                .path_to_filesystem(&location)
                .map_err(|e| JobError::Permanent(format!("{what}: {e}")))?;
            let real = path
                .canonicalize()
                .map_err(|e| JobError::transient(format!("resolving {what}: {e}")))?;
            if !real.starts_with(&self.root) {
                return Err(JobError::Permanent(format!(
                    "{what} points outside the storage root"
                )));
            }
            return Ok(LocalSource {
                path: real,
                size: meta.size,
            });
        }
        let path = scratch.join("source");
        let mut stream = self
            .store
            .get(&location)
            .await
            .map_err(|e| classify(&what, e))?
            .into_stream();
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(|e| JobError::transient(format!("creating scratch copy of {what}: {e}")))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify(&what, e))?;
            out.write_all(&chunk)
                .await
                .map_err(|e| JobError::transient(format!("writing scratch copy of {what}: {e}")))?;
        }
        out.flush()
            .await
            .map_err(|e| JobError::transient(format!("writing scratch copy of {what}: {e}")))?;
        Ok(LocalSource {
            path,
            size: meta.size,
        })
    }

    /// Key of a task's manifest.
    pub fn manifest_key(prefix: &StorageKey) -> StorageKey {
        prefix
            .join(MANIFEST)
            .expect("a valid prefix plus `manifest.json` is a valid key")
    }

    /// Commits a task's outputs: every file under `prefix/<run>/` (a fresh run id per
    /// attempt), then the manifest at `prefix/manifest.json`, created only if absent. So
    /// two workers finishing the same task (a redelivery while the first still ran) can
    /// never mix their files: the manifest names exactly one run's keys, and the loser
    /// deletes its own run. Returns the manifest written, or `Ok(None)` if another
    /// worker committed first.
    pub async fn commit(
        &self,
        prefix: &StorageKey,
        output: &TaskOutput,
        mut manifest: serde_json::Value,
    ) -> Result<Option<serde_json::Value>, JobError> {
        let run = format!("run-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let run_prefix = prefix
            .join(&format!("{run}/"))
            .map_err(|e| JobError::Permanent(e.to_string()))?;
        let mut listed = Vec::with_capacity(output.files.len());
        let mut written = Vec::with_capacity(output.files.len());
        for file in &output.files {
            let key = run_prefix
                .join(&file.name)
                .map_err(|e| JobError::Permanent(format!("output name `{}`: {e}", file.name)))?;
            let size = match self.put_file(&key, &file.path, &|_| {}).await {
                Ok(size) => size,
                Err(e) => {
                    self.delete_all(&written).await;
                    return Err(JobError::transient(e));
                }
            };
            written.push(key.clone());
            let mut entry =
                serde_json::json!({ "name": file.name, "key": key.as_str(), "size_bytes": size });
            if let (Some(entry), serde_json::Value::Object(meta)) =
                (entry.as_object_mut(), &file.meta)
            {
                entry.extend(meta.clone());
            }
            listed.push(entry);
        }
        if let Some(m) = manifest.as_object_mut() {
            m.insert("run".into(), run.clone().into());
            m.insert("outputs".into(), serde_json::Value::Array(listed));
            m.insert("summary".into(), output.summary.clone());
        }
        let body = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| JobError::transient(format!("serialising the manifest: {e}")))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let key = Self::manifest_key(prefix);
        match self
            .store
            .put_opts(&Self::path(&key), PutPayload::from(body), opts)
            .await
        {
            Ok(_) => Ok(Some(manifest)),
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.delete_all(&written).await;
                Ok(None)
            }
            Err(e) => {
                self.delete_all(&written).await;
                Err(classify(&format!("`{key}`"), e))
            }
        }
    }

    /// Every key under `prefix` (small listings: tests, status).
    pub async fn list(&self, prefix: &StorageKey) -> anyhow::Result<Vec<String>> {
        let mut stream = self.store.list(Some(&Self::path(prefix)));
        let mut keys = Vec::new();
        while let Some(meta) = stream.next().await {
            keys.push(
                meta.with_context(|| format!("listing `{prefix}`"))?
                    .location
                    .to_string(),
            );
        }
        Ok(keys)
    }

    /// Best-effort removal of keys (an abandoned run's files).
    async fn delete_all(&self, keys: &[StorageKey]) {
        for key in keys {
            if let Err(e) = self.store.delete(&Self::path(key)).await {
                tracing::warn!(%key, error = %e, "could not remove an abandoned output");
            }
        }
    }

    /// Reads a task's manifest, if the task has completed.
    pub async fn manifest(&self, prefix: &StorageKey) -> anyhow::Result<Option<serde_json::Value>> {
        match self.get_bytes(&Self::manifest_key(prefix)).await? {
            Some(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).context("parsing manifest.json")?,
            )),
            None => Ok(None),
        }
    }
}

/// Storage errors, named by what to do: a missing object or bucket and refused access
/// will not fix themselves; everything else (timeouts, throttling, 5xx, resets) may.
pub fn classify(what: &str, err: object_store::Error) -> JobError {
    let text = err.to_string();
    match err {
        object_store::Error::NotFound { .. } if text.contains("NoSuchBucket") => {
            JobError::Permanent(format!("{what}: the bucket does not exist ({text})"))
        }
        object_store::Error::NotFound { .. } => {
            JobError::Permanent(format!("{what} does not exist in storage"))
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            JobError::Permanent(format!("{what}: access denied ({text})"))
        }
        _ if text.contains("NoSuchBucket") => {
            JobError::Permanent(format!("{what}: the bucket does not exist ({text})"))
        }
        _ => JobError::Transient(format!("{what}: storage error ({text})")),
    }
}
