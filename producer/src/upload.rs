//! `producer upload`: check every file, build one job per task, stream each file into
//! storage (with a progress bar) and publish its jobs with confirms; optionally follow
//! them to the end ([`crate::wait`]).
//!
//! Everything that can be refused is refused before the first byte is stored or the
//! first message published: bad options, missing / unreadable / empty files, directories.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::types::{AMQPValue, FieldTable};
use shared::broker::persistent_json;
use shared::messages::{
    self, ImageFormat, JobMessage, LadderMode, OutputFormat, RUNGS, Rendition, Rung, Segmenting,
    SpriteSpec, ThumbnailJob, TranscodeJob, VideoCodec,
};
use shared::priority::Priority;
use shared::settings::Settings;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::tasks::{THUMBNAIL, TRANSCODE, TaskKind};
use shared::topology::Topology;
use uuid::Uuid;

use crate::cli::{JobArgs, UploadArgs};
use crate::exit::Failure;
use crate::publisher::{Broker, Outgoing};
use crate::wait;

/// Header with the uploaded file's name (display only: `producer dead list` and
/// `dead show` name the file). A header, not a job field, so the workers' message
/// contract is untouched; bounded and without control characters ([`source_name`]).
pub const SOURCE_NAME_HEADER: &str = "x-vidpipe-source-name";

/// Longest file name carried, in bytes (a Linux file name's own limit).
const SOURCE_NAME_MAX: usize = 255;

/// The file's own name (not its directory: that may say more than the operator should
/// see), control characters as `?`, cut to [`SOURCE_NAME_MAX`] bytes on a character
/// boundary.
pub fn source_name(file: &Path) -> String {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = String::new();
    for c in name.chars().map(|c| if c.is_control() { '?' } else { c }) {
        if out.len() + c.len_utf8() > SOURCE_NAME_MAX {
            break;
        }
        out.push(c);
    }
    out
}

/// `--codecs`: known names only, each once (a repeat is a slip, said as one).
fn parse_codecs(names: &[String]) -> Result<Vec<VideoCodec>, Failure> {
    let known = VideoCodec::ALL.map(VideoCodec::name).join(", ");
    let mut codecs = Vec::new();
    for name in names {
        let codec = VideoCodec::from_name(name).ok_or_else(|| {
            Failure::usage(format!(
                "--codecs: unknown codec `{}`; known: {known}",
                name.trim()
            ))
        })?;
        if codecs.contains(&codec) {
            return Err(Failure::usage(format!(
                "--codecs: `{}` is named twice",
                codec.name()
            )));
        }
        codecs.push(codec);
    }
    Ok(codecs)
}

/// Files uploading at once.
const CONCURRENT_UPLOADS: usize = 4;

/// What every job of one `upload` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOptions {
    /// Empty: the transcoder derives its default ladder from the source.
    pub renditions: Vec<Rendition>,
    pub formats: Vec<OutputFormat>,
    /// Video codecs, each its own ladder.
    pub codecs: Vec<VideoCodec>,
    pub thumbnails: u32,
    pub sprite: bool,
    pub segments: Segmenting,
    /// `--ladder`: fixed, or fitted to each source.
    pub ladder: LadderMode,
    /// Which work queue of each kind the jobs go to ([`shared::priority`]).
    pub priority: Priority,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            renditions: Vec::new(),
            formats: vec![OutputFormat::Mp4, OutputFormat::Hls],
            codecs: vec![VideoCodec::H264],
            thumbnails: 10,
            sprite: true,
            segments: Segmenting::Auto,
            ladder: LadderMode::Fixed,
            priority: Priority::Normal,
        }
    }
}

impl JobOptions {
    /// From the command line; every problem is a usage error saying what is accepted.
    pub fn from_args(args: &JobArgs) -> Result<Self, Failure> {
        // `--renditions ,,` or `--renditions ""` is a slip, not a request for the default
        // ladder: the default is asked for by leaving the flag out.
        if args.renditions.iter().any(|r| r.trim().is_empty()) {
            let given = args.renditions.join(",");
            let problem = if given.trim().is_empty() {
                "the list is empty".to_owned()
            } else {
                format!("`{given}` has an empty entry")
            };
            return Err(Failure::usage(format!(
                "--renditions: {problem}; give preset names ({}) or \
                 name:height:video_kbps:audio_kbps separated by commas, or leave --renditions out \
                 for the default ladder derived from the source",
                RUNGS.map(|r| r.name).join(", ")
            )));
        }
        let renditions = args
            .renditions
            .iter()
            .map(|r| parse_rendition(r.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failure::usage(format!("--renditions: {e}")))?;
        let mut formats = Vec::new();
        for f in &args.formats {
            let format = match f.trim().to_ascii_lowercase().as_str() {
                "mp4" => OutputFormat::Mp4,
                "hls" => OutputFormat::Hls,
                "cmaf" => OutputFormat::Cmaf,
                other => {
                    return Err(Failure::usage(format!(
                        "--formats: unknown format `{other}`; known: mp4, hls, cmaf"
                    )));
                }
            };
            if !formats.contains(&format) {
                formats.push(format);
            }
        }
        let codecs = parse_codecs(&args.codecs)?;
        let options = Self {
            renditions,
            formats,
            codecs,
            thumbnails: args.thumbnails,
            sprite: !args.no_sprite,
            segments: args.segments,
            ladder: args.ladder,
            priority: args.priority,
        };
        // The workers' own validation, run here so a bad ladder never reaches the queue.
        let plan = JobPlan::new(Uuid::nil(), "mp4", &options);
        plan.transcode
            .validate()
            .map_err(|e| Failure::usage(format!("--renditions/--formats/--codecs: {e}")))?;
        plan.thumbnail
            .validate()
            .map_err(|e| Failure::usage(format!("--thumbnails: {e}")))?;
        Ok(options)
    }
}

/// `720p` (a preset) or `name:height:video_kbps:audio_kbps`.
pub fn parse_rendition(spec: &str) -> Result<Rendition, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        [name] => RUNGS
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name))
            .map(Rung::rendition)
            .ok_or_else(|| {
                let known: Vec<&str> = RUNGS.iter().map(|r| r.name).collect();
                format!(
                    "unknown rendition `{name}`; known: {}, or give name:height:video_kbps:audio_kbps",
                    known.join(", ")
                )
            }),
        [name, height, video, audio] => {
            let number = |what: &str, v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("`{spec}`: {what} `{v}` is not a whole number"))
            };
            Ok(Rendition {
                name: (*name).into(),
                height: number("height", height)?,
                video_kbps: number("video_kbps", video)?,
                audio_kbps: number("audio_kbps", audio)?,
            })
        }
        _ => Err(format!(
            "`{spec}` is neither a preset name nor name:height:video_kbps:audio_kbps"
        )),
    }
}

/// A clear error for anything that is not a readable, non-empty regular file, or that is
/// a playlist, manifest or concat list rather than a video (the workers refuse those too,
/// with the same reason; saying so here stores nothing). Returns its size.
pub fn check_file(path: &Path) -> Result<u64, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{shown}: no such file"),
        std::io::ErrorKind::PermissionDenied => format!("{shown}: permission denied"),
        _ => format!("{shown}: cannot read it ({e})"),
    })?;
    if meta.is_dir() {
        return Err(format!(
            "{shown}: is a directory, not a video file (give the files inside it)"
        ));
    }
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    if meta.len() == 0 {
        return Err(format!("{shown}: the file is empty"));
    }
    std::fs::File::open(path).map_err(|e| format!("{shown}: cannot open it ({e})"))?;
    match shared::sniff::refusal_of_file(path) {
        Ok(Some(reason)) => return Err(format!("{shown}: {reason}")),
        Ok(None) => {}
        Err(e) => return Err(format!("{shown}: cannot read it ({e})")),
    }
    Ok(meta.len())
}

/// Storage extension of an upload: the file's own when it is a short alphanumeric one.
pub fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .filter(|e| !e.is_empty() && e.len() <= 8 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| "bin".into())
}

/// One upload's job id, source key and the message of each task.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub job_id: Uuid,
    pub source: StorageKey,
    /// The uploaded file's name ([`source_name`]); empty: none sent.
    pub source_name: String,
    /// Routes every message to its kind's normal or high queue.
    pub priority: Priority,
    pub transcode: TranscodeJob,
    pub thumbnail: ThumbnailJob,
}

impl JobPlan {
    pub fn new(job_id: Uuid, extension: &str, options: &JobOptions) -> Self {
        let key = |s: String| {
            StorageKey::new(s).expect("a uuid and a checked extension make a valid key")
        };
        let source = key(format!("uploads/{job_id}/source.{extension}"));
        Self {
            job_id,
            priority: options.priority,
            transcode: TranscodeJob {
                job_id,
                source: source.clone(),
                output_prefix: StorageKey::output_prefix(job_id, TRANSCODE.name)
                    .expect("a uuid and a task name make a valid key"),
                renditions: options.renditions.clone(),
                formats: options.formats.clone(),
                codecs: options.codecs.clone(),
                segments: options.segments,
                ladder: options.ladder,
                part: None,
            },
            thumbnail: ThumbnailJob {
                job_id,
                source: source.clone(),
                output_prefix: StorageKey::output_prefix(job_id, THUMBNAIL.name)
                    .expect("a uuid and a task name make a valid key"),
                poster: true,
                count: options.thumbnails,
                timestamps: Vec::new(),
                width: 320,
                format: ImageFormat::Jpeg,
                quality: 85,
                sprite: options.sprite.then_some(SpriteSpec {
                    interval_s: 2.0,
                    columns: 10,
                    width: 160,
                    keyframes_only: false,
                }),
            },
            source,
            source_name: String::new(),
        }
    }

    /// The same plan, its messages carrying the uploaded file's name.
    pub fn named(mut self, file: &Path) -> Self {
        self.source_name = source_name(file);
        self
    }

    /// Each task's kind and message body, in the registry's order. The one place the
    /// producer maps its options onto the typed message of each kind; a test checks it
    /// covers every builtin kind.
    fn bodies(&self) -> Vec<(TaskKind, Vec<u8>)> {
        vec![
            (TranscodeJob::KIND, messages::to_body(&self.transcode)),
            (ThumbnailJob::KIND, messages::to_body(&self.thumbnail)),
        ]
    }

    /// Task names, in publishing order.
    pub fn tasks(&self) -> Vec<&'static str> {
        self.bodies().iter().map(|(kind, _)| kind.name).collect()
    }

    /// One persistent message per task, routed to `video_tasks` by task name, with
    /// `.high` for high-priority jobs.
    pub fn messages(&self, topology: &Topology) -> Vec<Outgoing> {
        let mut headers = FieldTable::default();
        if !self.source_name.is_empty() {
            headers.insert(
                SOURCE_NAME_HEADER.into(),
                AMQPValue::LongString(self.source_name.as_bytes().to_vec().into()),
            );
        }
        self.bodies()
            .into_iter()
            .map(|(kind, body)| Outgoing {
                exchange: topology.tasks_exchange(),
                routing_key: self.priority.routing_key(kind.routing_key()),
                body,
                properties: persistent_json(headers.clone()),
            })
            .collect()
    }
}

/// Stores the source and publishes the jobs of one plan.
pub async fn store_and_publish(
    storage: &Storage,
    broker: &Broker,
    plan: &JobPlan,
    file: &Path,
    bar: &ProgressBar,
) -> anyhow::Result<u64> {
    let bytes = storage
        .put_file(&plan.source, file, &|sent| bar.set_position(sent))
        .await?;
    bar.set_message("publishing");
    broker.publish_all(&plan.messages(&broker.topology)).await?;
    Ok(bytes)
}

/// `producer upload`: check every file, store and publish them (a few at once), report
/// each, then follow them with `--wait`.
pub async fn run(settings: &Settings, args: UploadArgs) -> Result<(), Failure> {
    let options = JobOptions::from_args(&args.job)?;
    let sizes = check_files(&args.files)?;
    let storage = Storage::from_settings(&settings.storage).map_err(|e| {
        Failure::Infra(
            e.context("opening storage (settings `storage.*`, e.g. VIDPIPE__STORAGE__ROOT)"),
        )
    })?;
    let broker = Broker::connect(settings).await?;
    let plans: Vec<JobPlan> = args
        .files
        .iter()
        .map(|f| JobPlan::new(Uuid::new_v4(), &extension(f), &options).named(f))
        .collect();

    // Bind the event queue before publishing, so no event can be missed.
    let follower = if args.wait {
        let ids: Vec<Uuid> = plans.iter().map(|p| p.job_id).collect();
        Some(
            wait::Follower::start(&broker, &ids)
                .await
                .map_err(Failure::Infra)?,
        )
    } else {
        None
    };

    let interactive = !args.json && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if interactive {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let results = store_all(&storage, &broker, &plans, &args.files, &sizes, &multi).await;

    // From here on a Ctrl-C stops only the following: listen before the job ids are
    // printed, so whoever saw them can interrupt cleanly.
    let stop = follower.is_some().then(wait::interrupted);
    let (published, failed) = report(&args, &plans, results);

    let waited = match (follower, stop) {
        (Some(follower), Some(stop)) if !published.is_empty() => {
            let timeout = args.timeout.map(Duration::from_secs_f64);
            Some(
                follower
                    .wait(
                        &published,
                        &storage,
                        timeout,
                        &multi,
                        args.json,
                        interactive,
                        stop,
                    )
                    .await,
            )
        }
        _ => None,
    };
    if failed > 0 {
        return Err(Failure::Infra(anyhow::anyhow!(
            "{failed} of {} uploads failed (see above); the others were published",
            args.files.len()
        )));
    }
    waited.unwrap_or(Ok(()))
}

/// Every file's size, or a usage error naming every problem (nothing is uploaded then).
fn check_files(files: &[std::path::PathBuf]) -> Result<Vec<u64>, Failure> {
    let mut sizes = Vec::with_capacity(files.len());
    let mut problems = Vec::new();
    for file in files {
        match check_file(file) {
            Ok(size) => sizes.push(size),
            Err(e) => problems.push(e),
        }
    }
    if !problems.is_empty() {
        return Err(Failure::usage(format!(
            "{}\nnothing was uploaded or published",
            problems.join("\n")
        )));
    }
    Ok(sizes)
}

/// Stores and publishes every plan, [`CONCURRENT_UPLOADS`] at a time, each with its
/// progress bar; each file's index with its result.
async fn store_all(
    storage: &Storage,
    broker: &Broker,
    plans: &[JobPlan],
    files: &[std::path::PathBuf],
    sizes: &[u64],
    multi: &MultiProgress,
) -> Vec<(usize, anyhow::Result<u64>)> {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    futures::stream::iter(plans.iter().zip(files).zip(sizes).enumerate())
        .map(|(i, ((plan, file), size))| {
            let bar = multi.add(ProgressBar::new(*size));
            bar.set_style(style.clone());
            bar.set_prefix(short_name(file));
            async move {
                let result = store_and_publish(storage, broker, plan, file, &bar).await;
                bar.finish_and_clear();
                (i, result)
            }
        })
        .buffered(CONCURRENT_UPLOADS)
        .collect()
        .await
}

/// Prints each upload's job id (or its error); the jobs to follow, and how many failed.
fn report(
    args: &UploadArgs,
    plans: &[JobPlan],
    results: Vec<(usize, anyhow::Result<u64>)>,
) -> (Vec<wait::TrackedJob>, usize) {
    let mut published = Vec::new();
    let mut failed = 0;
    for (i, result) in results {
        let (plan, file) = (&plans[i], &args.files[i]);
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(e) => {
                failed += 1;
                eprintln!("producer: {}: {e:#}", file.display());
                continue;
            }
        };
        if args.json && !args.wait {
            crate::say!(
                "{}",
                serde_json::json!({
                    "job_id": plan.job_id, "file": file, "source": plan.source.as_str(),
                    "bytes": bytes, "tasks": plan.tasks(),
                })
            );
        } else if !args.json {
            crate::say!("{}", plan.job_id);
            eprintln!(
                "producer: {} stored as {} ({bytes} bytes); jobs published: {}",
                file.display(),
                plan.source,
                plan.tasks().join(", ")
            );
        }
        published.push(wait::TrackedJob {
            job_id: plan.job_id,
            file: file.clone(),
            tasks: plan.tasks().iter().map(|t| t.to_string()).collect(),
        });
    }
    (published, failed)
}

/// A file's name for a progress bar.
fn short_name(file: &Path) -> String {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    if name.chars().count() > 24 {
        let tail: String = name
            .chars()
            .rev()
            .take(23)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--renditions 1080p` asks for exactly the default ladder's 1080p.
    #[test]
    fn presets_are_the_default_ladder_rungs() {
        for rung in shared::messages::DEFAULT_LADDER {
            assert_eq!(parse_rendition(rung.name).unwrap(), rung.rendition());
        }
        assert_eq!(parse_rendition("1080p").unwrap().audio_kbps, 128);
    }

    #[test]
    fn presets_and_custom_renditions_parse() {
        assert_eq!(parse_rendition("720p").unwrap().height, 720);
        let r = parse_rendition("hd:720:2500:128").unwrap();
        assert_eq!(
            (r.name.as_str(), r.video_kbps, r.audio_kbps),
            ("hd", 2500, 128)
        );
        let e = parse_rendition("4k").unwrap_err();
        assert!(
            e.contains("unknown rendition `4k`") && e.contains("720p"),
            "{e}"
        );
        assert!(
            parse_rendition("a:b:c:d")
                .unwrap_err()
                .contains("not a whole number")
        );
    }

    #[test]
    fn default_plan_asks_for_the_default_ladder_and_thumbnails() {
        let plan = JobPlan::new(Uuid::new_v4(), "mp4", &JobOptions::default());
        assert!(plan.transcode.renditions.is_empty());
        assert_eq!(
            plan.transcode.formats,
            [OutputFormat::Mp4, OutputFormat::Hls]
        );
        assert_eq!(plan.transcode.codecs, [VideoCodec::H264]);
        assert!(plan.thumbnail.poster);
        assert_eq!(plan.thumbnail.count, 10);
        let sprite = plan.thumbnail.sprite.clone().unwrap();
        assert_eq!(
            (sprite.interval_s, sprite.columns, sprite.width),
            (2.0, 10, 160)
        );
        // What the workers will parse.
        let topology = Topology::new("", vec![], 20);
        for m in plan.messages(&topology) {
            match m.routing_key.as_str() {
                "transcode" => drop(messages::parse::<TranscodeJob>(&m.body).unwrap()),
                _ => drop(messages::parse::<ThumbnailJob>(&m.body).unwrap()),
            }
        }
    }

    /// A kind added to the registry but not planned here would never be published.
    #[test]
    fn the_plan_has_one_message_per_builtin_kind_in_registry_order() {
        let plan = JobPlan::new(Uuid::new_v4(), "mp4", &JobOptions::default());
        let builtin: Vec<&str> = shared::tasks::BUILTIN.iter().map(|k| k.name).collect();
        assert_eq!(plan.tasks(), builtin);
        let keys: Vec<String> = plan
            .messages(&Topology::new("", vec![], 20))
            .into_iter()
            .map(|m| m.routing_key)
            .collect();
        assert_eq!(keys, builtin);
    }

    /// `--ladder auto` reaches the transcode message; the default keeps the fixed ladder.
    #[test]
    fn the_ladder_mode_is_carried_in_the_transcode_message() {
        let body = |ladder| {
            let options = JobOptions {
                ladder,
                ..JobOptions::default()
            };
            let plan = JobPlan::new(Uuid::new_v4(), "mp4", &options);
            let m = plan.messages(&Topology::new("", vec![], 20)).remove(0);
            messages::parse::<TranscodeJob>(&m.body).unwrap().ladder
        };
        assert_eq!(body(LadderMode::Auto), LadderMode::Auto);
        assert_eq!(body(LadderMode::Fixed), LadderMode::Fixed);
    }

    /// `--priority high` routes every task to its `.high` queue.
    #[test]
    fn high_priority_jobs_are_routed_to_the_high_queues() {
        let options = JobOptions {
            priority: Priority::High,
            ..JobOptions::default()
        };
        let plan = JobPlan::new(Uuid::new_v4(), "mp4", &options);
        let keys: Vec<String> = plan
            .messages(&Topology::new("", vec![], 20))
            .into_iter()
            .map(|m| m.routing_key)
            .collect();
        assert_eq!(keys, ["transcode.high", "thumbnail.high"]);
    }

    #[test]
    fn the_file_name_sent_is_bounded_and_printable() {
        assert_eq!(source_name(Path::new("/home/a/holiday.mp4")), "holiday.mp4");
        assert_eq!(source_name(Path::new("a\nb.mp4")), "a?b.mp4");
        let long = "é".repeat(200);
        let sent = source_name(Path::new(&long));
        assert!(sent.len() <= SOURCE_NAME_MAX && sent.chars().all(|c| c == 'é'));
    }

    #[test]
    fn files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("e.mp4");
        std::fs::write(&empty, b"").unwrap();
        assert!(check_file(&empty).unwrap_err().contains("empty"));
        let playlist = dir.path().join("clip.mp4");
        std::fs::write(&playlist, "#EXTM3U\n#EXTINF:4,\n../other/source.mp4\n").unwrap();
        assert!(check_file(&playlist).unwrap_err().contains("HLS playlist"));
        assert!(check_file(dir.path()).unwrap_err().contains("directory"));
        assert!(
            check_file(&dir.path().join("none"))
                .unwrap_err()
                .contains("no such file")
        );
        assert_eq!(extension(&std::path::PathBuf::from("a/B.MOV")), "mov");
        assert_eq!(extension(&std::path::PathBuf::from("noext")), "bin");
    }
}
