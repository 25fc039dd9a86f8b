//! Media storage behind one small interface, on `object_store` (local filesystem by
//! default, rooted at `storage.root`).
//!
//! - Reads and writes stream; a whole video is never held in memory.
//! - Every object becomes visible only when complete (the filesystem store writes a
//!   staging file and renames it).
//! - A task's outputs are committed file by file, then its `manifest.json` last, written
//!   with create-if-absent: the manifest's presence means "this task is done", and two
//!   workers racing on the same task cannot both claim it.
//! - Nothing leaves the root: on the filesystem backend every key is resolved before it
//!   is read, written, listed or deleted, and one whose path runs through a symlink to
//!   somewhere outside `storage.root` is refused ([`OutsideRoot`], a permanent failure).
//!
//! - On the filesystem backend a job's storage steps also come synchronously
//!   ([`Storage::manifest_owner_blocking`], [`Storage::local_source_blocking`],
//!   [`Storage::commit_blocking`]), for the runtime to run several of them in one trip to
//!   a blocking thread: each trip costs about as much as routing a message through the
//!   broker, and a small job made six. The async methods use the same code.
//!
//! Errors are `anyhow` with what was being done as context and the store's own error as
//! the cause; what retrying cannot fix (a missing object or bucket, refused access, a
//! path out of the root, a manifest that is not one) is marked
//! [`permanent`]. The worker runtime turns them into a job's outcome
//! once, with [`JobError::classify`](crate::JobError::classify), so a dead letter's
//! reason keeps the whole chain.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::handler::{OutputFile, TaskOutput};
use crate::manifest::{Completion, Manifest, ManifestOutput, RESERVED_OUTPUT_FIELDS};
use crate::outcome::{PermanentExt as _, mark_permanent, permanent};
use crate::settings::{StorageBackend, StorageSettings};
use crate::storage_key::StorageKey;

/// Name of the per-task completion record under its output prefix.
pub const MANIFEST: &str = "manifest.json";

/// Object metadata on a manifest naming the job that committed it (on S3, the header
/// `x-amz-meta-job-id`): lets the owner check of a redelivered job be a `HEAD`.
pub const OWNER_METADATA: &str = "job-id";

/// Copy buffer for streaming files in and out.
const CHUNK: usize = 1 << 20;

/// What [`Storage::confined`]'s walk down a key's path saw.
enum Walk {
    /// A segment does not exist, so neither does the key, nor any key through it: the
    /// first `found` segments exist (plain directories), the next does not.
    Missing { found: usize },
    /// Every segment exists and none is a link: the last one's `lstat`, which is the
    /// key's own metadata.
    Plain(std::fs::Metadata),
    /// Not known: the walk went through a link (one that stays inside the root) or could
    /// not read a segment, or the store is not local. The path itself must be asked.
    Unknown { linked: bool },
}

impl Walk {
    /// Whether `key` is missing for what this walk of `walked` saw: it goes through the
    /// directory the walk found missing (the same leading segments up to that one).
    fn proves_missing(&self, walked: &StorageKey, key: &StorageKey) -> bool {
        let Walk::Missing { found } = *self else {
            return false;
        };
        let missing = leading_segments(walked, found + 1);
        missing.is_some() && leading_segments(key, found + 1) == missing
    }
}

/// The deepest directory two keys share (their common leading segments, neither key's
/// last), if they share one.
fn shared_dir<'k>(a: &'k StorageKey, b: &StorageKey) -> Option<&'k str> {
    let a_dir = a.as_str().trim_end_matches('/').rsplit_once('/')?.0;
    let b_dir = b.as_str().trim_end_matches('/').rsplit_once('/')?.0;
    // The byte length of the leading segments `a_dir` and `b_dir` have in common.
    let mut end = 0;
    for (x, y) in a_dir.split('/').zip(b_dir.split('/')) {
        if x != y {
            break;
        }
        end += if end == 0 { x.len() } else { x.len() + 1 };
    }
    (end > 0).then(|| &a_dir[..end])
}

/// Whether a file system error says the path is not there, as the object store sees it:
/// nothing at all, or a file where a directory of the path should be (nothing exists
/// under a file).
fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// The first `n` segments of `key`, if it has that many.
fn leading_segments(key: &StorageKey, n: usize) -> Option<Vec<&str>> {
    let leading: Vec<&str> = key
        .as_str()
        .trim_end_matches('/')
        .split('/')
        .take(n)
        .collect();
    (leading.len() == n).then_some(leading)
}

/// A key whose place on disk resolves outside the storage root: a symlink inside the root
/// (say `outputs/<job>/transcode -> /elsewhere`) leads out of it. Refused for every read,
/// write, listing and deletion; permanent, since the link will not go away by itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "storage key `{key}` resolves outside the storage root through a symlink ({link} -> {target}); refusing to use it"
)]
pub struct OutsideRoot {
    key: String,
    /// The path under the root that was resolved (the link itself or a directory above it).
    link: String,
    /// Where it leads, or why it leads nowhere (a dangling link).
    target: String,
}

/// The media store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Set for the filesystem backend: lets workers read sources in place.
    local: Option<Arc<LocalFileSystem>>,
    /// Canonical root of the filesystem backend (empty for S3).
    root: PathBuf,
    /// Where objects are looked for, for "does not exist" errors: a producer and a worker
    /// configured with different roots or buckets see each other's keys as missing, and
    /// only the place searched tells them apart.
    place: String,
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
            place: format!("storage root {} (setting `storage.root`)", root.display()),
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
            place: format!("S3 bucket `{}` (setting `storage.s3.bucket`)", s3.bucket),
            upload_buffer: settings.upload_buffer_bytes,
        })
    }

    fn path(key: &StorageKey) -> ObjectPath {
        ObjectPath::from(key.as_str().trim_end_matches('/'))
    }

    /// Checks that `key` stays inside the root on the filesystem backend (a no-op on S3,
    /// which has no links). The deepest part of its path that exists is resolved with
    /// every symlink followed and must still lie under the root; the parts below it do
    /// not exist yet, so the store creates them as plain directories and files.
    ///
    /// This guards against links planted in the storage tree, not against a local user
    /// racing to plant one between the check and the use: whoever can write the root
    /// directly is trusted. A refusal is an [`OutsideRoot`], marked permanent.
    fn confine(&self, key: &StorageKey) -> anyhow::Result<()> {
        self.confined(key).map(|_| ()).permanent()
    }

    /// [`Self::confine`]'s check, unmarked, and what it saw of the key's path.
    ///
    /// Walks down from the (canonical) root one segment at a time with `lstat`, until a
    /// segment does not exist: a chain of plain directories ends inside the root by
    /// construction (a key has no `.` or `..` segment), so only a chain with a link in it
    /// needs resolving ([`Self::confined_through_links`]). Every job checks several keys,
    /// and resolving each from `/` was most of what its storage checks cost; what the
    /// walk saw ([`Walk`]) spares the caller another look at the same path.
    fn confined(&self, key: &StorageKey) -> Result<Walk, OutsideRoot> {
        if self.local.is_none() {
            return Ok(Walk::Unknown { linked: false });
        }
        let mut at = self.root.clone();
        let mut last = None;
        for (found, segment) in key.as_str().trim_end_matches('/').split('/').enumerate() {
            at.push(segment);
            match at.symlink_metadata() {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return self
                        .confined_through_links(key)
                        .map(|()| Walk::Unknown { linked: true });
                }
                Ok(meta) => last = Some(meta),
                // Under a file nothing exists either, as the object store sees it.
                Err(e) if is_absent(&e) => {
                    return Ok(Walk::Missing { found });
                }
                Err(_) => return Ok(Walk::Unknown { linked: false }),
            }
        }
        Ok(last.map_or(Walk::Unknown { linked: false }, Walk::Plain))
    }

    /// [`Self::confined`] for a key whose path has a link in it: its deepest existing
    /// part, resolved with every link followed, must still lie under the root.
    fn confined_through_links(&self, key: &StorageKey) -> Result<(), OutsideRoot> {
        let mut existing = self.root.join(key.as_str().trim_end_matches('/'));
        // `symlink_metadata` sees a dangling link as existing, which `canonicalize` then
        // refuses: a link that leads nowhere is not followed either.
        while existing.symlink_metadata().is_err() {
            if !existing.pop() || existing == self.root {
                return Ok(());
            }
        }
        let outside = |target: String| OutsideRoot {
            key: key.to_string(),
            link: existing
                .strip_prefix(&self.root)
                .unwrap_or(&existing)
                .display()
                .to_string(),
            target,
        };
        match existing.canonicalize() {
            Ok(real) if real.starts_with(&self.root) => Ok(()),
            Ok(real) => Err(outside(real.display().to_string())),
            Err(e) => Err(outside(format!("unresolvable: {e}"))),
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &StorageKey) -> anyhow::Result<bool> {
        self.confine(key)?;
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
        self.confine(key)?;
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
        self.confine(key)?;
        self.store
            .put(&Self::path(key), PutPayload::from(bytes))
            .await
            .with_context(|| format!("writing `{key}` to storage"))?;
        Ok(())
    }

    /// Writes a small object only if nothing is stored under `key` yet (the manifest's
    /// create-if-absent, for other records such as cancel markers): true if this call
    /// created it, false if it was already there.
    pub async fn put_if_absent(&self, key: &StorageKey, bytes: Vec<u8>) -> anyhow::Result<bool> {
        self.confine(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&Self::path(key), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(classify(&format!("`{key}`"), e)),
        }
    }

    /// Deletes one object (absent is fine).
    pub async fn delete(&self, key: &StorageKey) -> anyhow::Result<()> {
        self.confine(key)?;
        match self.store.delete(&Self::path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting `{key}` from storage")),
        }
    }

    /// Reads a small object whole; `None` if absent.
    pub async fn get_bytes(&self, key: &StorageKey) -> anyhow::Result<Option<Vec<u8>>> {
        self.confine(key)?;
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
    /// scratch directory). Missing source, no bucket, access denied: marked permanent;
    /// other trouble (timeouts, throttling, 5xx) is left transient.
    pub async fn fetch(&self, key: &StorageKey, scratch: &FsPath) -> anyhow::Result<LocalSource> {
        self.fetch_as(key, &scratch.join("source")).await
    }

    /// [`Self::fetch`], with the scratch copy (backends other than the filesystem) at
    /// `copy`: a join fetches many objects into one scratch directory.
    pub async fn fetch_as(&self, key: &StorageKey, copy: &FsPath) -> anyhow::Result<LocalSource> {
        if self.local.is_some() {
            let (this, key) = (self.clone(), key.clone());
            return blocking(move || this.local_source_blocking(&key)).await;
        }
        let location = Self::path(key);
        let what = format!("source `{key}`");
        self.confine(key).with_context(|| what.clone())?;
        let meta = self.store.head(&location).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } if !e.to_string().contains("NoSuchBucket") => {
                self.missing(&what)
            }
            e => classify(&what, e),
        })?;
        let path = copy.to_path_buf();
        let mut stream = self
            .store
            .get(&location)
            .await
            .map_err(|e| classify(&what, e))?
            .into_stream();
        let mut out = tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("creating scratch copy of {what}"))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify(&what, e))?;
            out.write_all(&chunk)
                .await
                .with_context(|| format!("writing scratch copy of {what}"))?;
        }
        out.flush()
            .await
            .with_context(|| format!("writing scratch copy of {what}"))?;
        Ok(LocalSource {
            path,
            size: meta.size,
        })
    }

    /// A missing source: permanent, naming where it was looked for.
    fn missing(&self, what: &str) -> anyhow::Error {
        permanent(format!(
            "{what} does not exist in {}; the producer must store uploads in the same place",
            self.place
        ))
    }

    /// Whether this is the filesystem backend, whose `*_blocking` methods a caller on a
    /// blocking thread may use.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Where `key` is on disk (filesystem backend only; a permanent error on S3): the
    /// root joined with the key, the very path [`Self::confined`] checks. A key's alphabet
    /// (`A-Z a-z 0-9 / . _ -`, no empty, `.` or `..` segment) is one the object store maps
    /// to the same path unescaped (a test holds the two equal), and this is one join where
    /// the store's mapping goes through a URL, which was a tenth of what a small job cost.
    fn local_path(&self, key: &StorageKey) -> anyhow::Result<PathBuf> {
        if self.local.is_none() {
            return Err(permanent("not the filesystem storage backend"));
        }
        Ok(self.root.join(key.as_str().trim_end_matches('/')))
    }

    /// [`Self::fetch`] on the filesystem backend, synchronously: the source is read in
    /// place, so this only checks it (a file, inside the root once every link is followed)
    /// and resolves its path.
    pub fn local_source_blocking(&self, key: &StorageKey) -> anyhow::Result<LocalSource> {
        let what = format!("source `{key}`");
        let walk = self
            .confined(key)
            .permanent()
            .with_context(|| what.clone())?;
        let path = self.local_path(key).with_context(|| what.clone())?;
        let linked = match walk {
            Walk::Missing { .. } => return Err(self.missing(&what)),
            Walk::Plain(meta) if meta.is_file() => {
                // A chain of plain directories under the canonical root: already real.
                return Ok(LocalSource {
                    path,
                    size: meta.len(),
                });
            }
            // A directory is no object, as the store sees it.
            Walk::Plain(_) => return Err(self.missing(&what)),
            Walk::Unknown { linked } => linked,
        };
        let size = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta.len(),
            // A directory is no object, as the store sees it.
            Ok(_) => return Err(self.missing(&what)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(self.missing(&what)),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(mark_permanent(
                    anyhow::Error::new(e).context(format!("{what}: access denied")),
                ));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{what}: storage error"))),
        };
        if !linked {
            // A chain of plain directories under the canonical root: already real.
            return Ok(LocalSource { path, size });
        }
        let real = path
            .canonicalize()
            .with_context(|| format!("resolving {what}"))?;
        if !real.starts_with(&self.root) {
            return Err(permanent(format!("{what} points outside the storage root")));
        }
        Ok(LocalSource { path: real, size })
    }

    /// [`Self::exists`] on the filesystem backend, synchronously: what the confinement
    /// walk saw, or one `stat` where it went through a link.
    pub fn exists_blocking(&self, key: &StorageKey) -> anyhow::Result<bool> {
        match self.confined(key).permanent()? {
            Walk::Missing { .. } => return Ok(false),
            Walk::Plain(meta) => return Ok(meta.is_file()),
            Walk::Unknown { .. } => {}
        }
        match std::fs::metadata(self.local_path(key)?) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("checking `{key}` in storage")),
        }
    }

    /// [`Self::manifest_owner`] on the filesystem backend, synchronously: one read of the
    /// manifest (local files carry no owner metadata), none if the confinement walk
    /// already found a part of its path missing.
    pub fn manifest_owner_blocking(&self, prefix: &StorageKey) -> anyhow::Result<Option<Uuid>> {
        let key = Self::manifest_key(prefix);
        let walk = self.confined(&key).permanent()?;
        self.manifest_owner_walked(&key, &walk)
    }

    /// [`Self::manifest_owner_blocking`] of `prefix` and [`Self::exists_blocking`] of
    /// `marker` (a job's own manifest and its task's cancel marker), from one look where
    /// it can: a fresh job's prefix is not there yet, and neither is a marker in it.
    ///
    /// That look is one `lstat` of the deepest directory the two keys share, not a walk:
    /// if nothing is there, wherever its path leads, neither key exists, and "missing" is
    /// a safe answer to both questions even through a link (the job runs, and its commit
    /// confines every write it makes). Only a key that is found must be confined before
    /// it is read, so anything found is walked as before.
    pub fn owner_and_exists_blocking(
        &self,
        prefix: &StorageKey,
        marker: &StorageKey,
    ) -> (anyhow::Result<Option<Uuid>>, anyhow::Result<bool>) {
        let key = Self::manifest_key(prefix);
        if let (Some(_), Some(shared)) = (&self.local, shared_dir(&key, marker))
            && let Err(e) = self.root.join(shared).symlink_metadata()
            && is_absent(&e)
        {
            return (Ok(None), Ok(false));
        }
        let walk = match self.confined(&key).permanent() {
            Ok(walk) => walk,
            Err(e) => return (Err(e), self.exists_blocking(marker)),
        };
        let marked = if walk.proves_missing(&key, marker) {
            Ok(false)
        } else {
            self.exists_blocking(marker)
        };
        (self.manifest_owner_walked(&key, &walk), marked)
    }

    /// The owner of the manifest at `key`, whose confinement walk saw `walk`.
    fn manifest_owner_walked(&self, key: &StorageKey, walk: &Walk) -> anyhow::Result<Option<Uuid>> {
        if let Walk::Missing { .. } = walk {
            // A fresh job's: its prefix is not there yet.
            return Ok(None);
        }
        let bytes = match std::fs::read(self.local_path(key)?) {
            Ok(bytes) => bytes,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("reading `{key}` from storage")),
        };
        let manifest = Manifest::from_json(key, &bytes).permanent()?;
        Ok(Some(manifest.completion.job_id))
    }

    /// [`Self::commit`] on the filesystem backend, synchronously, with the same guarantees:
    /// each output is copied under a staging name and renamed into place, then the manifest
    /// is hard-linked into place, which fails if one is there (create-if-absent, atomic).
    /// The loser of a race, or a failed commit, removes its own run directory.
    pub fn commit_blocking(
        &self,
        prefix: &StorageKey,
        output: &TaskOutput,
        completion: Completion,
    ) -> anyhow::Result<Option<Manifest>> {
        let walk = self.confined(prefix).permanent()?;
        let (run, run_prefix) = new_run(prefix)?;
        let run_dir = self.local_path(&run_prefix)?;
        let target = Target {
            prefix,
            walk,
            run_prefix: &run_prefix,
        };
        let committed = self.commit_run_blocking(&target, run, output, completion);
        if !matches!(committed, Ok(Some(_))) {
            // Only this attempt ever wrote there (the run id is fresh).
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        committed
    }

    /// [`Self::commit_blocking`]'s writes, the run directory's removal left to it.
    fn commit_run_blocking(
        &self,
        target: &Target<'_>,
        run: String,
        output: &TaskOutput,
        completion: Completion,
    ) -> anyhow::Result<Option<Manifest>> {
        let mut outputs = Vec::with_capacity(output.files.len());
        let mut dirs = DirMaker {
            missing: target.missing_dir(&self.root),
            made: Vec::new(),
        };
        for file in &output.files {
            let key = output_key(target.run_prefix, file)?;
            target.confine(self, &key)?;
            let size = copy_into_place(&file.path, &self.local_path(&key)?, &mut dirs)
                .with_context(|| format!("writing `{key}` to storage"))?;
            outputs.push(entry(file, key, size));
        }
        let manifest = manifest_of(completion, run, outputs, output);
        let key = Self::manifest_key(target.prefix);
        target.confine(self, &key)?;
        let created = link_if_absent(&manifest.to_json(), &self.local_path(&key)?, &mut dirs)
            .with_context(|| format!("writing `{key}` to storage"))?;
        Ok(created.then_some(manifest))
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
    /// deletes its own run. Returns the manifest written (its sizes are what the runtime
    /// counts, so nothing is read back), or `Ok(None)` if another worker committed first.
    pub async fn commit(
        &self,
        prefix: &StorageKey,
        output: &TaskOutput,
        completion: Completion,
    ) -> anyhow::Result<Option<Manifest>> {
        if self.local.is_some() {
            let (this, prefix, output) = (self.clone(), prefix.clone(), output.clone());
            return blocking(move || this.commit_blocking(&prefix, &output, completion)).await;
        }
        self.confine(prefix)?;
        let (run, run_prefix) = new_run(prefix)?;
        let mut outputs = Vec::with_capacity(output.files.len());
        let mut written = Vec::with_capacity(output.files.len());
        for file in &output.files {
            let key = output_key(&run_prefix, file)?;
            let size = match self.put_file(&key, &file.path, &|_| {}).await {
                Ok(size) => size,
                Err(e) => {
                    self.delete_all(&written).await;
                    return Err(e);
                }
            };
            written.push(key.clone());
            outputs.push(entry(file, key, size));
        }
        let manifest = manifest_of(completion, run, outputs, output);
        let mut opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        opts.attributes.insert(
            Attribute::Metadata(OWNER_METADATA.into()),
            manifest.completion.job_id.to_string().into(),
        );
        let key = Self::manifest_key(prefix);
        if let Err(e) = self.confine(&key) {
            self.delete_all(&written).await;
            return Err(e);
        }
        match self
            .store
            .put_opts(
                &Self::path(&key),
                PutPayload::from(manifest.to_json()),
                opts,
            )
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
        self.confine(prefix)?;
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
            if let Err(e) = self.confined(key) {
                tracing::warn!(%key, error = %e, "not removing an abandoned output");
                continue;
            }
            if let Err(e) = self.store.delete(&Self::path(key)).await {
                tracing::warn!(%key, error = %e, "could not remove an abandoned output");
            }
        }
    }

    /// Removes everything under `prefix` (best effort: what cannot be removed is logged).
    /// For the parts of a split task once it is joined.
    pub async fn remove_prefix(&self, prefix: &StorageKey) {
        match self.list(prefix).await {
            Ok(keys) => {
                let keys: Vec<StorageKey> = keys
                    .into_iter()
                    .filter_map(|k| StorageKey::new(k).ok())
                    .collect();
                self.delete_all(&keys).await;
            }
            Err(e) => {
                tracing::warn!(%prefix, error = %format!("{e:#}"), "could not list parts to remove")
            }
        }
    }

    /// Reads a task's manifest, if the task has completed. A `manifest.json` that does
    /// not parse is an [`UnreadableManifest`](crate::manifest::UnreadableManifest) error,
    /// marked permanent (no retry makes it one).
    pub async fn manifest(&self, prefix: &StorageKey) -> anyhow::Result<Option<Manifest>> {
        let key = Self::manifest_key(prefix);
        match self.get_bytes(&key).await? {
            Some(bytes) => Ok(Some(Manifest::from_json(&key, &bytes).permanent()?)),
            None => Ok(None),
        }
    }

    /// Whether a task has completed (its manifest exists), by a metadata call alone: a
    /// `HEAD` on S3, a `stat` on the filesystem; the manifest itself is not read.
    pub async fn is_committed(&self, prefix: &StorageKey) -> anyhow::Result<bool> {
        self.exists(&Self::manifest_key(prefix)).await
    }

    /// Which job a task's committed outputs belong to, if the task is committed: the
    /// check of a redelivered job, which must not count another job's outputs as its
    /// own. Answered by a metadata call wherever the backend can: on S3 a `HEAD`, whose
    /// answer carries the owner ([`OWNER_METADATA`], set by [`Self::commit`]), so the
    /// manifest itself is never downloaded; on the filesystem a `stat`, then (only when
    /// there is a manifest) a read of it, since local files carry no metadata. A manifest
    /// without the metadata (written before it existed, or by hand) is read as well.
    pub async fn manifest_owner(&self, prefix: &StorageKey) -> anyhow::Result<Option<Uuid>> {
        if self.local.is_some() {
            let (this, prefix) = (self.clone(), prefix.clone());
            return blocking(move || this.manifest_owner_blocking(&prefix)).await;
        }
        let key = Self::manifest_key(prefix);
        self.confine(&key)?;
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let found = match self.store.get_opts(&Self::path(&key), head).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("checking `{key}` in storage")),
        };
        let owner = found
            .attributes
            .get(&Attribute::Metadata(OWNER_METADATA.into()))
            .and_then(|v| v.parse::<Uuid>().ok());
        if owner.is_some() {
            return Ok(owner);
        }
        Ok(self.manifest(prefix).await?.map(|m| m.completion.job_id))
    }
}

/// Runs a synchronous storage step on a blocking thread.
async fn blocking<T: Send + 'static>(
    step: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(step)
        .await
        .context("a storage step panicked")?
}

/// A fresh run id for one commit attempt, and its prefix under the task's.
fn new_run(prefix: &StorageKey) -> anyhow::Result<(String, StorageKey)> {
    let run = format!("run-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let run_prefix = prefix.join(&format!("{run}/")).permanent()?;
    Ok((run, run_prefix))
}

/// Where a local commit writes: its prefix, what the confinement walk saw of it, and the
/// attempt's run prefix under it.
struct Target<'a> {
    prefix: &'a StorageKey,
    walk: Walk,
    run_prefix: &'a StorageKey,
}

impl Target<'_> {
    /// Confines `key`, a key under the prefix, unless it lies under a directory the walk
    /// found missing: this commit makes that directory and everything in it, plainly.
    fn confine(&self, storage: &Storage, key: &StorageKey) -> anyhow::Result<()> {
        if self.walk.proves_missing(self.prefix, key) {
            return Ok(());
        }
        storage.confine(key)
    }

    /// The directory of the prefix that the walk found missing (its parent exists), under
    /// `root`.
    fn missing_dir(&self, root: &FsPath) -> Option<PathBuf> {
        let Walk::Missing { found } = self.walk else {
            return None;
        };
        let segments = leading_segments(self.prefix, found + 1)?;
        Some(
            segments
                .into_iter()
                .fold(root.to_path_buf(), |dir, s| dir.join(s)),
        )
    }
}

/// Makes the directories one local commit writes into, with as few `mkdir` calls as it
/// can. From the directory the confinement walk found missing it makes each level down
/// in turn, each call succeeding the first time (`create_dir_all` tries the deepest
/// first and fails its way up: three calls for a fresh job's prefix instead of two). A
/// directory this commit already made is not made again: a task's outputs share their run
/// directory, and the manifest's directory is above it.
struct DirMaker {
    /// The first directory of the commit's prefix that the walk found missing.
    missing: Option<PathBuf>,
    /// The directories this commit has made (or found) so far.
    made: Vec<PathBuf>,
}

impl DirMaker {
    /// Makes `dir` and whatever above it is missing.
    fn make(&mut self, dir: &FsPath) -> std::io::Result<()> {
        let exists = |made: &[PathBuf], dir: &FsPath| made.iter().any(|m| m.starts_with(dir));
        if exists(&self.made, dir) {
            return Ok(());
        }
        match &self.missing {
            Some(top) if dir.starts_with(top) => {
                // `top`, then each level below it down to `dir`, top first.
                let levels: Vec<&FsPath> =
                    dir.ancestors().take_while(|a| a.starts_with(top)).collect();
                for level in levels.into_iter().rev() {
                    if exists(&self.made, level) {
                        continue;
                    }
                    match std::fs::create_dir(level) {
                        Ok(()) => self.made.push(level.to_path_buf()),
                        // Made meanwhile (another delivery of the job committing too):
                        // the general way takes it from there, as it would have.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                            std::fs::create_dir_all(dir)?;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            _ => std::fs::create_dir_all(dir)?,
        }
        self.made.push(dir.to_path_buf());
        Ok(())
    }
}

/// Where an output file goes: its name under the run's prefix (a name that makes no
/// valid key is the handler's bug, permanent).
fn output_key(run_prefix: &StorageKey, file: &OutputFile) -> anyhow::Result<StorageKey> {
    run_prefix
        .join(&file.name)
        .with_context(|| format!("output name `{}`", file.name))
        .permanent()
}

/// The manifest entry of `file`, stored at `key` with `size` bytes.
fn entry(file: &OutputFile, key: StorageKey, size: u64) -> ManifestOutput {
    ManifestOutput {
        name: file.name.clone(),
        key,
        size_bytes: size,
        facts: handler_facts(&file.meta),
    }
}

/// The manifest of one committed run: both backends' commits write exactly this.
fn manifest_of(
    completion: Completion,
    run: String,
    outputs: Vec<ManifestOutput>,
    output: &TaskOutput,
) -> Manifest {
    Manifest {
        completion,
        run,
        outputs,
        summary: output.summary.clone(),
    }
}

/// A staging name beside `dest`: `<name>#<digits>`, the filesystem store's own form,
/// which its listings skip, so a half-written object is never listed.
fn staging_path(dest: &FsPath) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(format!("#{}", Uuid::new_v4().as_u64_pair().0));
    PathBuf::from(name)
}

/// Copies `from` to `dest` so that `dest` appears only complete (staged, then renamed);
/// the bytes copied.
fn copy_into_place(from: &FsPath, dest: &FsPath, dirs: &mut DirMaker) -> std::io::Result<u64> {
    if let Some(dir) = dest.parent() {
        dirs.make(dir)?;
    }
    let staged = staging_path(dest);
    let copied = std::fs::copy(from, &staged).and_then(|n| {
        std::fs::rename(&staged, dest)?;
        Ok(n)
    });
    if copied.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    copied
}

/// Writes `bytes` to `dest` only if nothing is there: staged, then hard-linked into place
/// (a link never replaces a name). False if `dest` existed.
fn link_if_absent(bytes: &[u8], dest: &FsPath, dirs: &mut DirMaker) -> std::io::Result<bool> {
    if let Some(dir) = dest.parent() {
        dirs.make(dir)?;
    }
    let staged = staging_path(dest);
    std::fs::write(&staged, bytes)?;
    let linked = match std::fs::hard_link(&staged, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&staged);
    linked
}

/// A handler's facts about one file as manifest fields: its JSON object's fields, less
/// the ones the runtime records itself ([`RESERVED_OUTPUT_FIELDS`]). Anything but an
/// object carries no fields.
fn handler_facts(meta: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let mut facts = match meta {
        serde_json::Value::Object(fields) => fields.clone(),
        _ => serde_json::Map::new(),
    };
    for reserved in RESERVED_OUTPUT_FIELDS {
        facts.remove(reserved);
    }
    facts
}

/// A store's error about `what` (`` source `k` ``), with the store's error (and its
/// causes) kept as the cause, marked by what to do: a missing object or bucket and
/// refused access will not fix themselves (permanent); everything else (timeouts,
/// throttling, 5xx, resets) may, and is left unmarked.
pub fn classify(what: &str, err: object_store::Error) -> anyhow::Error {
    let no_bucket = err.to_string().contains("NoSuchBucket");
    let (doing, lasting) = match err {
        _ if no_bucket => (format!("{what}: the bucket does not exist"), true),
        object_store::Error::NotFound { .. } => (format!("{what} does not exist in storage"), true),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => (format!("{what}: access denied"), true),
        _ => (format!("{what}: storage error"), false),
    };
    let err = anyhow::Error::new(err).context(doing);
    if lasting { mark_permanent(err) } else { err }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::JobError;

    fn key(k: &str) -> StorageKey {
        StorageKey::new(k).unwrap()
    }

    /// A local store in `dir/store`, and `dir/elsewhere`, a directory outside its root.
    fn store_and_elsewhere(dir: &FsPath) -> (Storage, PathBuf) {
        let storage = Storage::from_settings(&StorageSettings {
            root: dir.join("store"),
            ..Default::default()
        })
        .unwrap();
        let elsewhere = dir.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        (storage, elsewhere)
    }

    /// The runtime's facts for a test commit.
    fn completion() -> Completion {
        Completion {
            schema: 1,
            job_id: Uuid::new_v4(),
            task: "transcode".into(),
            source: key("uploads/j/source.mp4"),
            worker: "test".into(),
            attempt: 1,
            completed_at: "2026-11-30T14:00:00Z".into(),
            duration_s: 0.5,
        }
    }

    fn link(storage: &Storage, at: &str, to: &FsPath) {
        let at = storage.root.join(at);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(to, at).unwrap();
    }

    #[tokio::test]
    async fn no_write_read_or_listing_follows_a_symlink_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, elsewhere) = store_and_elsewhere(dir.path());
        std::fs::write(elsewhere.join("manifest.json"), b"{}").unwrap();
        link(&storage, "outputs/j/transcode", &elsewhere);
        link(&storage, "uploads/j", &elsewhere);
        link(
            &storage,
            "outputs/k/manifest.json",
            &elsewhere.join("manifest.json"),
        );
        link(&storage, "outputs/d/transcode", &dir.path().join("nowhere"));

        let refused = |e: anyhow::Error| matches!(JobError::classify(e), JobError::Permanent(r) if r.contains("outside the storage root"));
        let file = dir.path().join("out.txt");
        std::fs::write(&file, b"output").unwrap();
        for k in ["outputs/j/transcode/run-1/out.txt", "outputs/d/transcode/x"] {
            let err = storage.put_file(&key(k), &file, &|_| {}).await.unwrap_err();
            assert!(refused(err), "{k}");
        }
        let err = storage
            .put_bytes(&key("outputs/j/transcode/a"), b"x".to_vec())
            .await;
        assert!(refused(err.unwrap_err()));
        for k in [
            "outputs/j/transcode/manifest.json",
            "outputs/k/manifest.json",
        ] {
            assert!(
                refused(storage.get_bytes(&key(k)).await.unwrap_err()),
                "{k}"
            );
        }
        assert!(refused(
            storage
                .list(&key("outputs/j/transcode/"))
                .await
                .unwrap_err()
        ));
        assert!(refused(
            storage
                .exists(&key("uploads/j/source.mp4"))
                .await
                .unwrap_err()
        ));

        let mut output = TaskOutput::default();
        output.push("out.txt", &file, serde_json::json!({}));
        let err = storage
            .commit(&key("outputs/j/transcode/"), &output, completion())
            .await
            .unwrap_err();
        let err = JobError::classify(err);
        let JobError::Permanent(reason) = err else {
            panic!("a symlink out of the root is permanent: {err:?}");
        };
        assert!(
            reason.contains("outside the storage root") && reason.contains("outputs/j/transcode"),
            "{reason}"
        );

        std::fs::write(elsewhere.join("source.mp4"), b"video").unwrap();
        let err = storage
            .fetch(&key("uploads/j/source.mp4"), dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(JobError::classify(err), JobError::Permanent(r) if r.starts_with("source `uploads/j/source.mp4`: storage key")),
        );

        // Nothing was written outside: only the two files this test put there.
        let mut left: Vec<_> = std::fs::read_dir(&elsewhere)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["manifest.json", "source.mp4"]);
        assert!(!dir.path().join("nowhere").exists());
    }

    #[tokio::test]
    async fn commit_returns_the_manifest_it_stored_with_the_output_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _) = store_and_elsewhere(dir.path());
        let prefix = key("outputs/j/transcode/");
        assert!(storage.manifest_owner(&prefix).await.unwrap().is_none());
        assert!(!storage.is_committed(&prefix).await.unwrap());

        let mut output = TaskOutput::default();
        for (name, body) in [("a.txt", "12345"), ("b.txt", "123")] {
            let file = dir.path().join(name);
            std::fs::write(&file, body).unwrap();
            output.push(
                name,
                &file,
                serde_json::json!({ "key": "forged", "lines": 1 }),
            );
        }
        let written = storage
            .commit(&prefix, &output, completion())
            .await
            .unwrap()
            .expect("the first commit wins");
        assert_eq!(written.output_bytes(), 8);
        // The runtime's key wins over a handler fact of the same name.
        assert!(
            written.outputs[0]
                .key
                .as_str()
                .starts_with("outputs/j/transcode/run-")
        );
        assert_eq!(written.outputs[0].facts["lines"], 1);

        assert!(storage.is_committed(&prefix).await.unwrap());
        let stored = storage.manifest(&prefix).await.unwrap();
        assert_eq!(stored.as_ref(), Some(&written));
        assert_eq!(
            storage.manifest_owner(&prefix).await.unwrap(),
            Some(written.completion.job_id)
        );
        assert!(
            storage
                .commit(&prefix, &output, completion())
                .await
                .unwrap()
                .is_none(),
            "the second commit of a task loses"
        );
    }

    #[tokio::test]
    async fn a_symlink_that_stays_inside_the_root_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _) = store_and_elsewhere(dir.path());
        std::fs::create_dir_all(storage.root.join("shared")).unwrap();
        link(&storage, "outputs/j", &storage.root.join("shared"));
        storage
            .put_bytes(&key("outputs/j/a.txt"), b"x".to_vec())
            .await
            .unwrap();
        assert!(storage.root.join("shared/a.txt").is_file());
        assert_eq!(
            storage.get_bytes(&key("outputs/j/a.txt")).await.unwrap(),
            Some(b"x".to_vec())
        );
    }

    /// A `manifest.json` naming no job cannot be claimed: it does not read as a manifest,
    /// and that is a permanent failure, not one to retry.
    #[tokio::test]
    async fn an_anonymous_manifest_is_a_permanent_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _) = store_and_elsewhere(dir.path());
        let prefix = key("outputs/a/transcode/");
        storage
            .put_bytes(
                &Storage::manifest_key(&prefix),
                br#"{"task": "transcode"}"#.to_vec(),
            )
            .await
            .unwrap();
        let err = storage.manifest_owner(&prefix).await.unwrap_err();
        let err = err.context("checking for an existing manifest");
        assert!(matches!(
            JobError::classify(err),
            JobError::Permanent(r) if r.starts_with("checking for an existing manifest: ")
        ));
    }

    /// The blocking lookups a local job's checks use answer from what the confinement
    /// walk saw where they can ([`Walk`]); they must answer as the object store does on
    /// every kind of path: missing, a file, a directory, a link inside, a link outside.
    #[tokio::test]
    async fn the_blocking_lookups_answer_as_the_object_store_does() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, elsewhere) = store_and_elsewhere(dir.path());
        storage
            .put_bytes(&key("uploads/a/src.bin"), b"video".to_vec())
            .await
            .unwrap();
        storage
            .put_bytes(&key("shared/f.bin"), b"linked".to_vec())
            .await
            .unwrap();
        link(
            &storage,
            "uploads/inside",
            &storage.root.join("shared/f.bin"),
        );
        link(&storage, "uploads/outside", &elsewhere);
        std::fs::write(elsewhere.join("x"), b"secret").unwrap();
        let prefix = key("outputs/j/transcode/");
        let written = storage
            .commit(&prefix, &TaskOutput::default(), completion())
            .await
            .unwrap()
            .unwrap();

        for k in [
            "uploads/a/src.bin",
            "uploads/a",
            "uploads/none/src.bin",
            "uploads/inside",
            "outputs/j/transcode/manifest.json",
            "outputs/j/transcode/cancelled.json",
        ] {
            assert_eq!(
                storage.exists_blocking(&key(k)).unwrap(),
                storage.exists(&key(k)).await.unwrap(),
                "{k}"
            );
        }
        // Under a file there is no object, as on S3 (the local object store errs there).
        assert!(
            !storage
                .exists_blocking(&key("uploads/a/src.bin/deeper"))
                .unwrap()
        );
        for k in ["uploads/outside/x", "uploads/outside"] {
            assert!(storage.exists_blocking(&key(k)).is_err(), "{k}");
        }

        // A plain source is read where it is; one through a link inside the root, at the
        // link's real target.
        for (k, path, size) in [
            ("uploads/a/src.bin", "uploads/a/src.bin", 5),
            ("uploads/inside", "shared/f.bin", 6),
        ] {
            let source = storage.local_source_blocking(&key(k)).unwrap();
            assert_eq!(
                (source.path, source.size),
                (storage.root.join(path), size),
                "{k}"
            );
        }
        for k in ["uploads/a", "uploads/none/src.bin"] {
            let err = storage.local_source_blocking(&key(k)).unwrap_err();
            assert!(
                matches!(JobError::classify(err), JobError::Permanent(r) if r.contains("does not exist")),
                "{k}"
            );
        }
        assert!(
            storage
                .local_source_blocking(&key("uploads/outside/x"))
                .is_err()
        );

        for (p, owner) in [
            ("outputs/j/transcode/", Some(written.completion.job_id)),
            ("outputs/k/transcode/", None),
            ("uploads/a/", None),
        ] {
            assert_eq!(
                storage.manifest_owner_blocking(&key(p)).unwrap(),
                owner,
                "{p}"
            );
            assert_eq!(storage.manifest_owner(&key(p)).await.unwrap(), owner, "{p}");
        }

        // One walk for a manifest and a marker answers as two lookups, a marker that
        // only shares a string prefix with the missing directory included.
        storage
            .put_bytes(&key("outputs/m/transcode/cancelled.json"), b"{}".to_vec())
            .await
            .unwrap();
        for (p, marker) in [
            ("outputs/j/transcode/", "outputs/j/transcode/cancelled.json"),
            ("outputs/k/transcode/", "outputs/k/transcode/cancelled.json"),
            (
                "outputs/k/transcode/parts/2/",
                "outputs/k/transcode/cancelled.json",
            ),
            (
                "outputs/mm/transcode/",
                "outputs/m/transcode/cancelled.json",
            ),
            ("outputs/k/transcode/", "outputs/m/transcode/cancelled.json"),
        ] {
            let (owner, marked) = storage.owner_and_exists_blocking(&key(p), &key(marker));
            assert_eq!(
                (owner.unwrap(), marked.unwrap()),
                (
                    storage.manifest_owner_blocking(&key(p)).unwrap(),
                    storage.exists(&key(marker)).await.unwrap()
                ),
                "{p} {marker}"
            );
        }
    }

    /// The filesystem path of a key is the one the object store itself maps it to.
    #[test]
    fn a_keys_path_is_the_one_the_object_store_maps_it_to() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _) = store_and_elsewhere(dir.path());
        let local = storage.local.clone().unwrap();
        for k in [
            "uploads/a.b/source-1_X.mp4",
            "outputs/3f2a/transcode/",
            "a/b/c/d.e.f",
            "-._/x",
        ] {
            let key = key(k);
            assert_eq!(
                storage.local_path(&key).unwrap(),
                local.path_to_filesystem(&Storage::path(&key)).unwrap(),
                "{k}"
            );
        }
    }

    /// A store's error stays the cause of the reason; only what cannot fix itself is
    /// permanent.
    #[test]
    fn store_errors_keep_their_cause_and_say_what_to_do() {
        let reset = object_store::Error::Generic {
            store: "S3",
            source: "connection reset by peer".into(),
        };
        let JobError::Transient(reason) = JobError::classify(classify("source `k`", reset)) else {
            panic!("a reset is worth retrying");
        };
        assert!(
            reason.starts_with("source `k`: storage error: ")
                && reason.ends_with("connection reset by peer"),
            "{reason}"
        );
        let denied = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: "403 Forbidden".into(),
        };
        let JobError::Permanent(reason) = JobError::classify(classify("source `k`", denied)) else {
            panic!("refused access is permanent");
        };
        assert!(
            reason.starts_with("source `k`: access denied: ") && reason.contains("403 Forbidden"),
            "{reason}"
        );
    }

    /// A commit's directories are made from the level its walk found missing down, each
    /// once; a level made meanwhile by someone else is taken as it is.
    #[test]
    fn a_commit_makes_each_missing_directory_once_and_tolerates_a_racing_one() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("outputs/job");
        std::fs::create_dir(dir.path().join("outputs")).unwrap();
        let mut dirs = DirMaker {
            missing: Some(job.clone()),
            made: Vec::new(),
        };
        let run = job.join("transcode/run-1/720p");
        dirs.make(&run).unwrap();
        assert!(run.is_dir());
        // The run's directory and the prefix above it are known made: nothing is tried.
        let made = dirs.made.len();
        dirs.make(&job.join("transcode")).unwrap();
        dirs.make(&run).unwrap();
        assert_eq!(dirs.made.len(), made, "{:?}", dirs.made);
        // Another delivery made a level first: still made, nothing fails.
        let racing = dir.path().join("outputs/other");
        std::fs::create_dir_all(racing.join("transcode")).unwrap();
        let mut dirs = DirMaker {
            missing: Some(racing.clone()),
            made: Vec::new(),
        };
        dirs.make(&racing.join("transcode/run-2")).unwrap();
        assert!(racing.join("transcode/run-2").is_dir());
    }

    /// The directory two keys share: their common leading segments, neither key's last.
    #[test]
    fn shared_dir_is_the_common_leading_directories() {
        let shared = |a: &str, b: &str| shared_dir(&key(a), &key(b)).map(str::to_owned);
        assert_eq!(
            shared(
                "outputs/j/transcode/manifest.json",
                "outputs/j/transcode/.cancel"
            ),
            Some("outputs/j/transcode".into())
        );
        assert_eq!(
            shared(
                "outputs/j/transcode/parts/s1/manifest.json",
                "outputs/j/transcode/.c"
            ),
            Some("outputs/j/transcode".into())
        );
        assert_eq!(
            shared("outputs/jj/m", "outputs/j/m"),
            Some("outputs".into())
        );
        assert_eq!(shared("a/m", "b/m"), None);
        assert_eq!(shared("m", "outputs/m"), None);
    }

    /// A fresh job's manifest and cancel marker are missing from one look, even when the
    /// job's directory would lie behind a link out of the root (missing is safe: nothing
    /// is read there); a found manifest behind such a link is still refused.
    #[test]
    fn a_fresh_jobs_manifest_and_marker_are_missing_and_a_linked_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, elsewhere) = store_and_elsewhere(dir.path());
        let (prefix, marker) = (
            key("outputs/j/transcode/"),
            key("outputs/j/transcode/.cancel"),
        );
        let (owner, marked) = storage.owner_and_exists_blocking(&prefix, &marker);
        assert!(matches!((owner, marked), (Ok(None), Ok(false))));
        std::fs::create_dir_all(elsewhere.join("transcode")).unwrap();
        std::fs::write(elsewhere.join("transcode/manifest.json"), b"{}").unwrap();
        std::fs::create_dir_all(dir.path().join("store/outputs")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("store/outputs/j")).unwrap();
        let (owner, _) = storage.owner_and_exists_blocking(&prefix, &marker);
        let refused = format!("{:#}", owner.unwrap_err());
        assert!(refused.contains("outside the storage root"), "{refused}");
    }
}
