//! What `producer watch` sees in its folder: which names it considers at all, when a file
//! counts as fully written, and the state file that makes an upload in progress survive a
//! restart.
//!
//! - **Names.** Only the folder's top level. Skipped without a word: dotfiles (the state
//!   file among them), names ending in `.part`, `.partial`, `.tmp`, `.crdownload` or
//!   `~` (what copiers and browsers write before the final rename), names that are not
//!   UTF-8, and anything that is not a regular file: symbolic links are never followed, so
//!   a link cannot make the watcher upload a file from outside the folder.
//! - **Settled.** A file is ready once its size, modification time and inode have been
//!   the same at every look for the settle period. A file replaced while it settles (a
//!   new inode: `mv` over it) or still growing starts over. Whether a writer still holds
//!   it open is not checked (that would mean reading every process's file descriptors),
//!   so the settle period must be longer than a writer's longest pause.
//! - **State file** `.vidpipe-watch.json`, written atomically (a temporary file renamed
//!   over it): the file being uploaded and its job id, recorded before the first byte is
//!   stored and removed once the file has moved to `done/`. After a crash in between,
//!   the same file (same size and modification time) is published again under the same
//!   job id: the workers treat a job id's second delivery as the same job, so a restart
//!   never makes two jobs of one file.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The state file's name inside the watched folder.
pub const STATE_FILE: &str = ".vidpipe-watch.json";

/// Most files tracked at once: a folder of many thousands is worked through in this many
/// at a time (the others are seen at later looks), so memory stays bounded.
pub const MAX_TRACKED: usize = 10_000;

/// Name endings of files still being written by their copier.
const PARTIAL_SUFFIXES: [&str; 6] = [".part", ".partial", ".tmp", ".crdownload", ".swp", "~"];

/// Extensions of the video files the watcher uploads; anything else goes to `failed/`.
pub const VIDEO_EXTENSIONS: [&str; 16] = [
    "mp4", "mov", "m4v", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "m2ts", "mts", "flv", "wmv",
    "3gp", "ogv", "mxf",
];

/// Whether the watcher looks at a name at all.
pub fn considered(name: &str) -> bool {
    !name.starts_with('.') && !PARTIAL_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Whether a name's extension is one of a video file.
pub fn is_video_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// What identifies one version of a file: if any of it changes, the file is not the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub size: u64,
    pub mtime_ns: i128,
    pub dev: u64,
    pub ino: u64,
    /// Hard links: more than one means the same bytes are reachable from elsewhere.
    pub nlink: u64,
}

impl Version {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
            nlink: meta.nlink(),
        }
    }
}

/// Every considered regular file at the folder's top level, by name (at most
/// [`MAX_TRACKED`]), not following links.
pub fn scan(dir: &Path) -> std::io::Result<BTreeMap<String, Version>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !considered(&name) {
            continue;
        }
        // `DirEntry::metadata` does not follow symbolic links.
        match entry.metadata() {
            Ok(meta) if meta.file_type().is_file() => {
                found.insert(name, Version::of(&meta));
            }
            _ => continue,
        }
        if found.len() >= MAX_TRACKED {
            break;
        }
    }
    Ok(found)
}

/// The files seen, and since when each has been unchanged.
#[derive(Debug, Default)]
pub struct Settling {
    seen: HashMap<String, (Version, Instant)>,
}

impl Settling {
    /// Takes in one look at the folder (`now`), forgetting what is gone; returns the
    /// names that have been unchanged for `settle`, in name order.
    pub fn look(
        &mut self,
        found: &BTreeMap<String, Version>,
        now: Instant,
        settle: Duration,
    ) -> Vec<String> {
        self.seen.retain(|name, _| found.contains_key(name));
        let mut ready = Vec::new();
        for (name, version) in found {
            let since = match self.seen.get(name) {
                Some((seen, since)) if seen == version => *since,
                _ => {
                    self.seen.insert(name.clone(), (*version, now));
                    now
                }
            };
            if now.duration_since(since) >= settle {
                ready.push(name.clone());
            }
        }
        ready
    }

    /// Starts `name` over (it changed under an upload).
    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }
}

/// An upload in progress, as the state file records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub job_id: Uuid,
    pub size: u64,
    pub mtime_ns: i128,
}

/// The state file's contents: uploads in progress by file name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WatchState {
    pub uploading: BTreeMap<String, Pending>,
    #[serde(skip)]
    path: PathBuf,
}

impl WatchState {
    /// Reads `dir`'s state file (none yet: empty). An unreadable one is an error: it
    /// would otherwise be overwritten, and with it what it knew.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let mut state: Self = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a watch state file ({e}); move it away to start afresh",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        state.path = path;
        Ok(state)
    }

    /// The job id to publish `name` under: the recorded one when this very version of it
    /// was being uploaded before a restart, else a new one.
    pub fn job_id_for(&self, name: &str, version: &Version) -> Uuid {
        match self.uploading.get(name) {
            Some(p) if p.size == version.size && p.mtime_ns == version.mtime_ns => p.job_id,
            _ => Uuid::new_v4(),
        }
    }

    /// Records (`Some`) or clears (`None`) the upload of `name`, and saves at once.
    pub fn set(&mut self, name: &str, pending: Option<Pending>) -> anyhow::Result<()> {
        match pending {
            Some(p) => self.uploading.insert(name.to_owned(), p),
            None => self.uploading.remove(name),
        };
        self.save()
    }

    /// Writes the state file atomically: a temporary file beside it, synced, renamed.
    fn save(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        let tmp = self
            .path
            .with_extension(format!("tmp-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| anyhow::anyhow!("writing {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_hidden_and_state_files_are_not_considered() {
        for name in [
            ".x.mp4",
            STATE_FILE,
            "a.mp4.part",
            "a.mp4~",
            "a.crdownload",
            "a.tmp",
        ] {
            assert!(!considered(name), "{name}");
        }
        assert!(considered("holiday.MP4") && is_video_name("holiday.MP4"));
        assert!(considered("notes.txt") && !is_video_name("notes.txt"));
        assert!(!is_video_name("noext"));
    }

    /// A file counts once it is unchanged for the settle period; a change starts over.
    #[test]
    fn a_file_is_ready_only_after_it_stopped_changing() {
        let version = |size, ino| Version {
            size,
            mtime_ns: 1,
            dev: 1,
            ino,
            nlink: 1,
        };
        let settle = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut s = Settling::default();
        let look = |s: &mut Settling, v: Version, secs| {
            let found = BTreeMap::from([("a.mp4".to_owned(), v)]);
            s.look(&found, t0 + Duration::from_secs(secs), settle)
        };
        assert!(look(&mut s, version(1, 1), 0).is_empty());
        assert!(look(&mut s, version(2, 1), 4).is_empty(), "still growing");
        assert!(look(&mut s, version(2, 1), 8).is_empty());
        assert_eq!(look(&mut s, version(2, 1), 9), ["a.mp4"]);
        assert!(look(&mut s, version(2, 9), 10).is_empty(), "replaced");
        assert_eq!(look(&mut s, version(2, 9), 15), ["a.mp4"]);
    }

    #[test]
    fn symlinks_and_folders_are_not_scanned() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.mp4"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("done")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("b.mp4")).unwrap();
        let found = scan(dir.path()).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["a.mp4"]);
    }

    /// A restart reuses the job id of the upload it interrupted, for the same version only.
    #[test]
    fn the_state_file_keeps_the_job_id_of_an_interrupted_upload() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = WatchState::load(dir.path()).unwrap();
        let v = Version {
            size: 3,
            mtime_ns: 7,
            dev: 1,
            ino: 2,
            nlink: 1,
        };
        let id = state.job_id_for("a.mp4", &v);
        let pending = Pending {
            job_id: id,
            size: 3,
            mtime_ns: 7,
        };
        state.set("a.mp4", Some(pending)).unwrap();
        let again = WatchState::load(dir.path()).unwrap();
        assert_eq!(again.job_id_for("a.mp4", &v), id);
        assert_ne!(again.job_id_for("a.mp4", &Version { size: 4, ..v }), id);
    }
}
