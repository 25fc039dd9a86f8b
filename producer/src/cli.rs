//! The command line: every command, its flags and its `--help` text (with an example).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use shared::messages::{LadderMode, Segmenting};
use shared::priority::Priority;

/// Upload videos to vidpipe, follow their jobs and administer parked (dead) jobs.
#[derive(Debug, Parser)]
#[command(
    name = "producer",
    version,
    after_help = "Examples:
  producer upload holiday.mp4 --wait
  producer status 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e
  producer cancel 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e
  producer workers
  producer dead list

Settings: built-in defaults, then --config FILE (or $VIDPIPE_CONFIG), then VIDPIPE__SECTION__KEY
environment variables, e.g. VIDPIPE__AMQP__URL=amqp://user:pass@host:5672/%2f,
VIDPIPE__STORAGE__ROOT=/srv/media, VIDPIPE__TOPOLOGY__PREFIX=staging.

Exit codes: 0 done, 1 a task is dead (or the job is unknown, or nothing was left to cancel),
2 usage error, 3 broker or storage trouble, 4 --wait timed out, 5 --wait stopped by Ctrl-C
or SIGTERM (the jobs keep running), 6 --wait: a task was cancelled. See docs/producer.md."
)]
pub struct Cli {
    /// TOML settings file (else $VIDPIPE_CONFIG; VIDPIPE__* variables override both)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store each file and publish a transcode and a thumbnail job for it; print the job ids.
    #[command(after_help = concat!(
        "Examples:\n",
        "  producer upload holiday.mp4\n",
        "  producer upload a.mp4 b.mov --renditions 720p,360p --formats hls --wait\n",
        "  producer upload talk.mp4 --renditions hd:720:2500:128,sd:360:700:96 --thumbnails 5 --no-sprite\n",
        "  producer upload urgent.mp4 --priority high --wait\n\n",
        "Every file is checked before anything is published. Without options the transcoder derives\n",
        "its default ladder from the source (never upscaling), writes MP4 and HLS, and the thumbnailer\n",
        "writes a poster, 10 thumbnails and a sprite sheet with WebVTT.\n\n",
        "Prints one job id per file on stdout (--json: one JSON object per line). With --wait, live\n",
        "progress goes to stderr and the exit code says how the tasks ended: 0 all completed,\n",
        "1 a task is dead (its reason is printed), 4 --timeout ran out, 5 stopped by Ctrl-C or\n",
        "SIGTERM (the jobs keep running; follow them with `producer status JOB_ID`), 6 a task was\n",
        "cancelled (`producer cancel`). 2 usage error, 3 broker or storage trouble.\n\n",
        "--priority high: under a backlog the jobs start before every normal job queued before\n",
        "them; normal work still gets one start in every 5 while it waits. Retries keep it.",
    ))]
    Upload(UploadArgs),
    /// Upload every video file that appears in a folder, once it is fully written; move it
    /// to done/ (or failed/, with the reason beside it). Runs until Ctrl-C or SIGTERM.
    #[command(after_help = concat!(
        "Examples:\n",
        "  producer watch /srv/incoming\n",
        "  producer watch ./watch --settle 10 --priority high --wait\n",
        "  producer watch ./watch --renditions 720p,360p --thumbnails 5\n\n",
        "A file is uploaded once its size and modification time have been unchanged for --settle\n",
        "seconds. Skipped: dotfiles, names ending in .part, .tmp, .crdownload, .partial or ~,\n",
        "symbolic links, folders. Files that are not videos by their extension (mp4 mov m4v mkv\n",
        "webm avi mpg mpeg ts m2ts mts flv wmv 3gp ogv) and files the upload check refuses move\n",
        "to failed/ with a NAME.reason.txt beside them. Each uploaded file moves to done/ and its\n",
        "job id is printed (JOB_ID<TAB>NAME). The state file .vidpipe-watch.json remembers an\n",
        "upload in progress, so a restart after a crash publishes it again under the same job id\n",
        "(which the workers treat as one job) instead of making a second one.",
    ))]
    Watch(WatchArgs),
    /// Show each task of a job: completed (with its outputs), dead (with the reason) or pending.
    #[command(after_help = concat!(
        "Example:\n",
        "  producer status 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e --json\n\n",
        "Completed tasks are read from outputs/<job_id>/<task>/manifest.json; dead ones are found in\n",
        "the dead-letter queue (video_tasks.dead) without taking them out. Exit code 0 if the job is\n",
        "known (whatever its state), 1 if nothing of it exists, 3 broker or storage trouble.",
    ))]
    Status(StatusArgs),
    /// Cancel a job's unfinished tasks: queued ones are dropped when delivered, running ones
    /// stop within seconds; nothing is retried and no partial output is left.
    #[command(after_help = concat!(
        "Examples:\n",
        "  producer cancel 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e\n",
        "  producer cancel 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e --task thumbnail --json\n\n",
        "Writes outputs/<job_id>/<task>/cancelled.json for each unfinished task (a job split into\n",
        "segments is cancelled whole: every segment and the stitch), then tells running workers to\n",
        "stop. `cancelled` is final, like completed and dead: `status` and `upload --wait` show it.\n",
        "A task that already completed, died or was cancelled is left alone and reported; a task\n",
        "that completes at the very moment of the cancel keeps its result and is reported so.\n",
        "Exit code 0 if a task was cancelled, 1 if the job is unknown or nothing was left to\n",
        "cancel (nothing changed), 2 usage error, 3 broker or storage trouble.",
    ))]
    Cancel(CancelArgs),
    /// List the live workers: kind, version, host, jobs running (with percent) and uptime,
    /// as they announce themselves on video_events.
    #[command(after_help = concat!(
        "Examples:\n",
        "  producer workers\n",
        "  producer workers --json\n",
        "  producer workers --all --listen 20\n\n",
        "Listens to the workers' heartbeats (every `worker.heartbeat_secs`, default 5 s) for a\n",
        "period and a half plus a second, then lists who was heard. A worker silent for longer\n",
        "than `worker.gone_after_secs` (default 15 s) is gone, one that shut down is stopped; --all\n",
        "lists those too. --json: one JSON object per worker per line.",
    ))]
    Workers(WorkersArgs),
    /// Inspect, replay or purge jobs parked in the dead-letter queue (video_tasks.dead).
    #[command(
        subcommand,
        after_help = "Examples:\n  producer dead list\n  producer dead show 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e\n  \
            producer dead show 3f9a0c1b2d4e\n  producer dead replay --all\n  producer dead purge 3f9a0c1b2d4e --yes\n\n\
            Each parked message has its own ID (12 hex digits, the first column of `dead list`):\n\
            show, replay and purge take it, or a job id for every parked message of that job."
    )]
    Dead(DeadCommand),
    /// List the task kinds every upload is split into (the task registry), or the broker
    /// users derived from it.
    #[command(after_help = concat!(
        "Examples:\n",
        "  producer tasks\n",
        "  producer tasks --json\n",
        "  producer tasks --broker-users --prefix staging.\n\n",
        "Needs no broker and no settings. --broker-users prints one line per RabbitMQ user,\n",
        "tab separated: role (user vidpipe-ROLE), configure, write and read regexes, tags; what\n",
        "scripts/rabbitmq-users.sh applies. --broker-definitions prints the compose broker's\n",
        "definitions with @ROLE@ where each password hash goes (docker/secrets.sh fills them in).",
    ))]
    Tasks(TasksArgs),
}

#[derive(Debug, Args)]
pub struct TasksArgs {
    /// One JSON array of task kinds on stdout
    #[arg(long)]
    pub json: bool,
    /// The least-privilege broker users instead, one tab-separated line each
    #[arg(long, conflicts_with_all = ["json", "broker_definitions"])]
    pub broker_users: bool,
    /// The broker definitions (users, vhost, permissions) as JSON, password hashes left as @ROLE@
    #[arg(long, conflicts_with = "json")]
    pub broker_definitions: bool,
    /// Topology prefix the names and permissions are for (the setting `topology.prefix`)
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Video files to upload (uploaded concurrently)
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// What to make of each file
    #[command(flatten)]
    pub job: JobArgs,
    /// Follow the jobs until every task is completed or dead; the exit code says which
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit code 4)
    #[arg(long, value_name = "SECS", requires = "wait")]
    pub timeout: Option<f64>,
    /// Machine-readable output: one JSON object per job on stdout, no progress bars
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The folder to watch (only its top level; `done/` and `failed/` are made in it)
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// What to make of each file
    #[command(flatten)]
    pub job: JobArgs,
    /// A file counts as fully written once its size and modification time have not
    /// changed for this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = positive_secs)]
    pub settle: f64,
    /// How often the folder is looked at, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = positive_secs)]
    pub poll: f64,
    /// Follow each upload's jobs with live progress; a file whose task ends dead moves
    /// from done/ to failed/
    #[arg(long)]
    pub wait: bool,
}

/// A positive, finite number of seconds.
fn positive_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds between 0 and 86400"
        )),
    }
}

/// What every job asks for: shared by `upload` and `watch`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Rendition ladder: preset names (1080p, 720p, 480p, 360p, 240p) or
    /// name:height:video_kbps:audio_kbps, comma separated. Default: derived from the source
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub renditions: Vec<String>,
    /// Output formats, comma separated: mp4, hls (MPEG-TS segments), cmaf (fMP4 segments
    /// with an HLS master and a DASH MPD)
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "mp4,hls"
    )]
    pub formats: Vec<String>,
    /// Video codecs, comma separated, each a ladder of its own: h264, hevc, av1 (hevc and
    /// av1 need --formats mp4 or cmaf)
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "h264"
    )]
    pub codecs: Vec<String>,
    /// Split a long transcode over many transcoders: `auto` (sources longer than the
    /// workers' `transcoder.segment_threshold_secs`) or `off` (one worker, one pass)
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = segmenting)]
    pub segments: Segmenting,
    /// `fixed` (the transcoder's CRF, each rung's own cap) or `auto` (each rung's CRF and
    /// cap fitted to the content by a quick probe; rungs that add nothing are dropped)
    #[arg(long, value_name = "MODE", default_value = "fixed", value_parser = ladder_mode)]
    pub ladder: LadderMode,
    /// Number of evenly spaced thumbnails (besides the poster), 0 to 1000
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        allow_negative_numbers = true,
        value_parser = thumbnail_count
    )]
    pub thumbnails: u32,
    /// Make a sprite sheet with a WebVTT track (the default)
    #[arg(long, overrides_with = "no_sprite")]
    pub sprite: bool,
    /// No sprite sheet
    #[arg(long, overrides_with = "sprite")]
    pub no_sprite: bool,
    /// `high` or `normal`: high jobs start before the normal backlog (at most 4 high starts
    /// in a row while normal jobs wait)
    #[arg(long, value_name = "PRIORITY", default_value = "normal")]
    pub priority: Priority,
}

/// `--thumbnails N`: negative numbers reach this parser (instead of clap's "did you mean
/// `-- -1`"), so the error says what a count may be.
fn thumbnail_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n < 0 => Err(format!(
            "the thumbnail count must be 0 or more (0: only the poster), not {n}"
        )),
        Ok(n) => u32::try_from(n).map_err(|_| format!("{n} thumbnails is over the limit of 1000")),
        Err(_) => Err(format!(
            "`{s}` is not a whole number: give how many thumbnails, 0 or more"
        )),
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job id printed by `producer upload`
    pub job_id: String,
    /// One JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id printed by `producer upload`
    pub job_id: String,
    /// Cancel only this task of the job (default: every unfinished task)
    #[arg(long, value_name = "TASK", value_parser = clap::builder::PossibleValuesParser::new(shared::tasks::BUILTIN_NAMES))]
    pub task: Option<String>,
    /// One JSON object on stdout: what happened to each task
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// One JSON object per worker per line on stdout
    #[arg(long)]
    pub json: bool,
    /// Also list workers heard but gone (silent too long) or stopped
    #[arg(long)]
    pub all: bool,
    /// Listen this many seconds (default: 1.5 heartbeat periods + 1 s)
    #[arg(long, value_name = "SECS")]
    pub listen: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List every parked message, oldest first: id, when, job, task, attempts, worker,
    /// uploaded file, reason.
    #[command(
        after_help = "Examples:\n  producer dead list\n  producer dead list --wide\n  producer dead list --json\n\n\
        Times are UTC to the second. Reasons longer than 72 characters are cut with `…`; --wide\n\
        (or `producer dead show ID`) shows them whole. Messages are looked at and put back\n\
        (basic.get, then nack with requeue): nothing is taken out."
    )]
    List {
        /// One JSON object per message on stdout
        #[arg(long)]
        json: bool,
        /// Reasons and file names whole, however long
        #[arg(long)]
        wide: bool,
    },
    /// Show a parked message (by its ID) or every parked message of a job: one field per
    /// line, the reason whole, the job's settings summarised, the other headers.
    #[command(after_help = "Examples:\n  producer dead show 3f9a0c1b2d4e\n  \
        producer dead show 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e --json")]
    Show {
        /// A message ID from `producer dead list`, or a job id
        #[arg(value_name = "ID|JOB_ID")]
        target: String,
        /// One JSON object per message on stdout: what we make of it, its headers and body
        #[arg(long)]
        json: bool,
    },
    /// Send parked messages back to video_tasks with their original routing key and the
    /// attempt count reset to 1.
    #[command(
        after_help = "Examples:\n  producer dead replay 6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e\n  producer dead replay 3f9a0c1b2d4e\n  \
        producer dead replay --all\n\n\
        Each message is republished with a publisher confirm before its parked copy is acked, so\n\
        nothing is lost (at worst, after a crash in between, a job is replayed twice). Reason\n\
        headers are dropped. Fix the cause first (e.g. deploy the fixed worker), or the job will\n\
        come straight back here."
    )]
    Replay {
        /// The message (its ID from `producer dead list`) or the job (all its parked
        /// tasks) to replay
        #[arg(
            value_name = "ID|JOB_ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        target: Option<String>,
        /// Replay every parked message
        #[arg(long)]
        all: bool,
    },
    /// Delete parked messages for good: one (by its ID), a job's, or all. Needs --yes.
    #[command(
        after_help = "Examples:\n  producer dead purge 3f9a0c1b2d4e --yes\n  producer dead purge --yes\n\n\
        Without an ID every parked message is deleted. Without --yes nothing is deleted and the\n\
        exit code is 2. Consider `producer dead list --json` first to keep a record."
    )]
    Purge {
        /// The message (its ID from `producer dead list`) or the job to delete; all without
        #[arg(value_name = "ID|JOB_ID")]
        target: Option<String>,
        /// Confirm that the parked messages should be deleted
        #[arg(long)]
        yes: bool,
    },
}

/// `--ladder fixed|auto`.
fn ladder_mode(s: &str) -> Result<LadderMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "fixed" => Ok(LadderMode::Fixed),
        "auto" => Ok(LadderMode::Auto),
        other => Err(format!("unknown ladder `{other}`; known: fixed, auto")),
    }
}

/// `--segments auto|off`.
fn segmenting(s: &str) -> Result<Segmenting, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Segmenting::Auto),
        "off" => Ok(Segmenting::Off),
        other => Err(format!("unknown mode `{other}`; known: auto, off")),
    }
}
