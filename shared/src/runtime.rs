//! The worker runtime: the one consume → decide → ack / retry / dead-letter loop.
//!
//! Both workers hand a [`Handler`] and a shutdown token to [`run`]. Per connection:
//! declare the topology, set prefetch = concurrency, consume the task's queue and run
//! each delivery on a blocking thread. Each outcome becomes a broker action through the
//! pure [`decide`]; a retry or dead letter is published with a confirm *before* the
//! original is acked, so a crash in between duplicates a job at worst and never loses one.
//!
//! Broker loss: in-flight jobs are cancelled (their deliveries return to the queue when
//! the channel dies, so finishing them would only be wasted work), then the worker
//! reconnects with backoff and resumes. Shutdown: stop consuming (`basic.cancel`; what
//! was prefetched but not started goes back at once), let in-flight jobs finish within
//! the grace period, cancel and requeue the rest, and only then close the channels and
//! the connection: a delivery can only be acked on the channel it came on, so that
//! channel must outlive every job of the session.
//!
//! Reconnection is done here, not by lapin's auto-recovery: a recovered channel cannot
//! ack the deliveries of the old one anyway, and a fresh connection re-declares the
//! topology and re-registers the consumer in one well-understood path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::broker;
use crate::events::{EventPublisher, JobState, now_rfc3339};
use crate::handler::{Handler, JobContext, ScratchDir, TaskOutput};
use crate::health::{Health, TaskSeries};
use crate::inflight::InFlight;
use crate::intake::Intake;
use crate::manifest::Completion;
use crate::messages::{self, JobMessage};
use crate::outcome::{Action, JobError, Outcome, RetryPolicy, decide};
use crate::priority::Priority;
use crate::settings::Settings;
use crate::settlement::{Ledger, Settlement};
use crate::split::{self, FanIn, Inputs, PartRef};
use crate::storage::Storage;
use crate::storage_key::StorageKey;
use crate::topology::Topology;

/// Our own attempt counter (1-based number of the delivery it travels with). RabbitMQ
/// 3.13+ no longer counts `x-death` for client-republished messages, so we keep ours.
pub const ATTEMPT_HEADER: &str = "x-vidpipe-attempt";
/// Dead-letter headers: why, after how many attempts, by whom, when, from where.
pub const REASON_HEADER: &str = "x-vidpipe-reason";
pub const ATTEMPTS_HEADER: &str = "x-vidpipe-attempts";
pub const WORKER_HEADER: &str = "x-vidpipe-worker";
pub const FAILED_AT_HEADER: &str = "x-vidpipe-failed-at";
pub const TASK_HEADER: &str = "x-vidpipe-task";
/// On a retried message: the error of the previous attempt.
pub const LAST_ERROR_HEADER: &str = "x-vidpipe-last-error";
/// On a dead letter whose body was over [`messages::MAX_MESSAGE_BYTES`]: the body's
/// original size in bytes. The parked body is cut to the limit, so the parking lot
/// cannot be used to store big blobs.
pub const TRUNCATED_FROM_HEADER: &str = "x-vidpipe-truncated-from";

/// Everything [`run`] needs besides the handler and the shutdown signal.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub settings: Settings,
    /// Jobs at once and the prefetch count.
    pub concurrency: u16,
    pub storage: Storage,
    pub health: Health,
}

/// State shared by every job of one worker.
struct Worker<H: Handler> {
    handler: Arc<H>,
    settings: Settings,
    concurrency: u16,
    storage: Storage,
    health: Health,
    /// The task's metric series, looked up once.
    series: TaskSeries,
    topology: Topology,
    policy: RetryPolicy,
    name: String,
    job_timeout: Duration,
    /// Running deliveries, shared with the cancel listener and the heartbeats.
    in_flight: InFlight,
    /// Who this worker is, for its announcements.
    identity: crate::workers::Identity,
}

/// Why a consume session ended.
enum SessionEnd {
    /// Shutdown requested; in-flight jobs are settled and the channels closed.
    Shutdown,
    /// The connection or channel failed; reconnect.
    Lost(anyhow::Error),
}

/// Runs the worker until `shutdown` fires and in-flight jobs are settled.
pub async fn run<H: Handler>(
    handler: H,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = options.settings;
    let worker = Arc::new(Worker {
        handler: Arc::new(handler),
        // The handler's own kind joins the builtin ones: a kind outside the builtin
        // registry (the tests' `copy`) still gets its queue, retries and dead letters.
        topology: Topology::from_settings(&settings).with_kind(H::Job::KIND),
        policy: settings.retry.policy(),
        name: settings.worker.name(),
        job_timeout: Duration::from_secs_f64(settings.worker.job_timeout_secs),
        concurrency: options.concurrency,
        in_flight: Default::default(),
        identity: crate::workers::Identity::new(
            settings.worker.name(),
            H::Job::TASK,
            options.concurrency,
            Duration::from_secs_f64(settings.worker.heartbeat_secs),
        ),
        storage: options.storage,
        series: options.health.track_task(H::Job::TASK),
        health: options.health,
        settings,
    });
    tokio::fs::create_dir_all(&worker.settings.worker.scratch_dir)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create scratch dir {} (setting `worker.scratch_dir`): {e}",
                worker.settings.worker.scratch_dir.display()
            )
        })?;
    let stale_after = worker.job_timeout
        + Duration::from_secs_f64(worker.settings.worker.shutdown_grace_secs)
        + Duration::from_secs(60);
    let scratch_root = worker.settings.worker.scratch_dir.clone();
    let _ =
        tokio::task::spawn_blocking(move || remove_stale_scratch(&scratch_root, stale_after)).await;
    tracing::info!(worker = %worker.name, task = H::Job::TASK, concurrency = worker.concurrency, "worker starting");

    let mut backoff = Duration::from_millis(200);
    let max_backoff = Duration::from_secs_f64(worker.settings.amqp.max_backoff_secs.max(0.1));
    loop {
        let Some(conn) = broker::connect(&worker.settings.amqp, &worker.name, &shutdown).await
        else {
            break;
        };
        let jobs = TaskTracker::new();
        // Cancels this session's in-flight jobs: on broker loss at once, on shutdown
        // after the grace period.
        let cancel_jobs = CancellationToken::new();
        let started = Instant::now();
        let end = consume(&worker, &conn, &jobs, &cancel_jobs, &shutdown).await;
        worker.health.set_ready(false);
        jobs.close();
        match end {
            SessionEnd::Shutdown => {
                if let Err(e) = conn.close(200, "worker shutting down".into()).await {
                    tracing::warn!(error = %e, "closing the broker connection failed");
                }
                break;
            }
            SessionEnd::Lost(err) => {
                tracing::warn!(error = %format!("{err:#}"), "lost the broker; cancelling in-flight jobs (they will be redelivered) and reconnecting");
                cancel_jobs.cancel();
                jobs.wait().await;
                let _ = conn.close(200, "reconnecting".into()).await;
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(200);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
    tracing::info!(worker = %worker.name, "worker stopped");
    Ok(())
}

/// Removes `job-*` scratch directories left by a crashed worker. Only directories older
/// than any job could live (time limit + grace + a margin) go, so workers sharing the
/// scratch directory never delete each other's live jobs.
fn remove_stale_scratch(root: &std::path::Path, stale_after: Duration) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let is_job_dir = entry
            .file_name()
            .to_string_lossy()
            .starts_with(crate::handler::SCRATCH_PREFIX);
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if is_job_dir && age.is_some_and(|a| a > stale_after) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed scratch left by a crashed worker")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "could not remove stale scratch")
                }
            }
        }
    }
}

/// Shutdown: in-flight jobs get the grace period, then are cancelled (and requeued).
async fn drain<H: Handler>(
    worker: &Worker<H>,
    jobs: &TaskTracker,
    cancel_jobs: &CancellationToken,
) {
    let grace = Duration::from_secs_f64(worker.settings.worker.shutdown_grace_secs);
    if !jobs.is_empty() {
        tracing::info!(in_flight = jobs.len(), grace = ?grace, "waiting for in-flight jobs to finish");
    }
    if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
        tracing::warn!(
            in_flight = jobs.len(),
            "grace period over; cancelling in-flight jobs and requeueing them"
        );
        cancel_jobs.cancel();
        jobs.wait().await;
    }
}

/// One connection's consume session: both priority queues of the task through the
/// [`Intake`]'s start gate (high deliveries first, see [`crate::priority`]).
async fn consume<H: Handler>(
    worker: &Arc<Worker<H>>,
    conn: &Connection,
    jobs: &TaskTracker,
    cancel_jobs: &CancellationToken,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let setup = async {
        let channel = conn.create_channel().await?;
        let queue = worker.topology.work_queue(H::Job::TASK);
        worker
            .topology
            .ensure(&channel, worker.settings.topology.declare, &queue)
            .await?;
        let publisher = broker::confirm_channel(conn).await?;
        let events = EventPublisher::new(
            channel,
            worker.topology.events_exchange(),
            worker.name.clone(),
        )
        .with_progress_to(worker.in_flight.clone());
        let intake = Intake::open(
            conn,
            &worker.topology,
            H::Job::TASK,
            &worker.name,
            worker.concurrency,
        )
        .await?;
        let operator = crate::operator::OperatorChannel::start(
            conn,
            &worker.topology.events_exchange(),
            worker.identity.clone(),
            &events,
            &worker.in_flight,
        )
        .await?;
        Ok::<_, anyhow::Error>((publisher, events, intake, operator))
    };
    let (publisher, events, mut intake, operator) = match setup.await {
        Ok(s) => s,
        Err(e) => {
            return SessionEnd::Lost(e.context("setting up the consumer"));
        }
    };
    worker.health.set_ready(true);
    tracing::info!(queue = %worker.topology.work_queue(H::Job::TASK), prefetch = worker.concurrency, "consuming (and its .high queue first)");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = intake.next() => match next {
                Ok(start) => {
                    let worker = worker.clone();
                    let (publisher, events, cancel) = (publisher.clone(), events.clone(), cancel_jobs.clone());
                    jobs.spawn(async move {
                        let _slot = start.slot;
                        process(&worker, start.delivery, start.settlement, &publisher, &events, cancel).await
                    });
                }
                Err(e) => return SessionEnd::Lost(e),
            },
        }
    }
    // Shutdown. Every channel of the session stays open until its jobs are settled:
    // dropping a consumer's channel would close it, and the acks of jobs that finish
    // within the grace period would be lost, their messages redelivered.
    worker.health.set_ready(false);
    let consumed = intake.stop().await;
    jobs.close();
    drain(worker, jobs, cancel_jobs).await;
    operator.end();
    events.finish(Duration::from_secs(5)).await;
    // Each consuming channel sends the acks it holds for a batch before it closes.
    for ledger in &consumed {
        if let Err(e) = ledger.close().await {
            tracing::warn!(error = %e, "closing a channel failed");
        }
    }
    if let Err(e) = publisher.close(200, "worker shutting down".into()).await {
        tracing::warn!(error = %e, "closing a channel failed");
    }
    SessionEnd::Shutdown
}

/// Stops deliveries (`basic.cancel`) and returns at once the ones already prefetched
/// but not started, so other workers can take them during the grace period instead of
/// after it. After the cancel-ok the consumer yields what it buffered, then ends.
pub(crate) async fn stop_consuming(ledger: &Arc<Ledger>, mut consumer: lapin::Consumer) {
    if let Err(e) = ledger
        .channel()
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
    {
        tracing::warn!(error = %e, "cancelling the consumer failed");
        return;
    }
    let returned = async {
        let mut count = 0;
        while let Some(Ok(delivery)) = consumer.next().await {
            Settlement::new(ledger, delivery.delivery_tag)
                .nack_requeue()
                .await;
            count += 1;
        }
        if count > 0 {
            tracing::info!(count, "returned prefetched jobs to the queue unstarted");
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), returned)
        .await
        .is_err()
    {
        tracing::warn!("the consumer did not end after its cancel");
    }
}

/// Runs one delivery end to end: parse, handle, decide, settle.
async fn process<H: Handler>(
    worker: &Worker<H>,
    delivery: Delivery,
    settlement: Settlement,
    publisher: &Channel,
    events: &EventPublisher,
    cancel: CancellationToken,
) {
    let task = H::Job::TASK;
    let attempt = attempt_of(&delivery);
    let priority = Priority::of_routing_key(delivery.routing_key.as_str());
    worker.health.in_flight.inc();
    let parsed =
        check_content_type(&delivery).and_then(|()| messages::parse::<H::Job>(&delivery.data));
    let (outcome, job_id, part) = match parsed {
        Ok(job) => {
            let job_id = job.job_id();
            let part = job.part();
            let span = tracing::info_span!("job", %job_id, task, attempt, part = part.as_ref().map(PartRef::label));
            let run = Run {
                events,
                publisher,
                settlement: &settlement,
                part: part.as_ref(),
                attempt,
                priority,
            };
            let tracked = worker.in_flight.track(job_id, task, part.as_ref(), &cancel);
            let parts = crate::cancel::parts_of(&job);
            let outcome = run_job(worker, job, &run, tracked.token())
                .instrument(span)
                .await;
            let outcome = tracked.settle(outcome);
            if outcome == Outcome::CancelledByOperator {
                Box::pin(crate::cancel::remove_parts(&worker.storage, &parts)).await;
            }
            (outcome, job_id, part)
        }
        Err(poison) => (
            Outcome::Poison(poison.to_string()),
            loose_job_id(&delivery.data),
            None,
        ),
    };
    let span = tracing::info_span!("job", %job_id, task, attempt);
    let run = Run {
        events,
        publisher,
        settlement: &settlement,
        part: part.as_ref(),
        attempt,
        priority,
    };
    settle(worker, &delivery, job_id, &outcome, &run)
        .instrument(span)
        .await;
    worker.health.in_flight.dec();
}

/// What one delivery's run carries besides the job: where its events and follow-ups
/// go, which part of a split task it is, its attempt.
struct Run<'a> {
    events: &'a EventPublisher,
    /// The confirm-mode channel retries, dead letters, fan-outs and joins are published on.
    publisher: &'a Channel,
    /// Acks or requeues the delivery, once (the commit's trip may already have acked it).
    settlement: &'a Settlement,
    part: Option<&'a PartRef>,
    attempt: u32,
    /// The job's priority (its routing key's): parts and joins it publishes inherit it.
    priority: Priority,
}

impl Run<'_> {
    fn emit<H: Handler>(
        &self,
        job_id: Uuid,
        state: JobState,
        percent: Option<f64>,
        detail: Option<String>,
    ) {
        self.events.emit(
            job_id,
            H::Job::TASK,
            self.part,
            state,
            self.attempt,
            percent,
            detail,
        );
    }
}

/// Does the work of one parsed job and says how it went: prepare (storage checks, input,
/// scratch), run the handler, commit ([`run_steps`]), with the job's events meanwhile
/// ([`with_events`]).
async fn run_job<H: Handler>(
    worker: &Worker<H>,
    job: H::Job,
    run: &Run<'_>,
    cancel: CancellationToken,
) -> Outcome {
    let job_id = job.job_id();
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(0.0f64);
    // Boxed: passed by value, it would be held twice in this future (here and in
    // `with_events`), and every job's task is moved whole when spawned.
    let steps = Box::pin(run_steps(worker, job, run, cancel, progress_tx));
    with_events::<H, _>(worker, run, job_id, progress_rx, steps).await
}

/// Drives a job's `steps` and sends its events while they run: `started` once it has run
/// for `worker.started_event_after_secs` (0.5 s by default), then its progress at most
/// once a second, from this task (none is spawned per job).
///
/// A job over sooner sends neither. Nothing needs them: `--wait` and `status` follow a
/// task to its outcome (`completed`, `failed`, `retrying`, `dead`, all still sent by
/// [`settle`]) and read the manifests besides, and a `started` is only shown while it is
/// the latest word. Every event is a message the broker routes; for small jobs `started`
/// was a third of what each job cost it.
async fn with_events<H: Handler, F: std::future::Future<Output = Outcome>>(
    worker: &Worker<H>,
    run: &Run<'_>,
    job_id: Uuid,
    mut progress: tokio::sync::watch::Receiver<f64>,
    steps: F,
) -> Outcome {
    const PROGRESS_EVERY: Duration = Duration::from_secs(1);
    tokio::pin!(steps);
    let after = Duration::from_secs_f64(worker.settings.worker.started_event_after_secs);
    let mut next = tokio::time::Instant::now() + after;
    // Set to 0 (tests that read the start order): sent before the job runs, every time,
    // not left to a race between a zero timer and a job that is over within a tick.
    let mut announced = after.is_zero();
    if announced {
        run.emit::<H>(job_id, JobState::Started, None, None);
        next += PROGRESS_EVERY;
    }
    loop {
        tokio::select! {
            biased;
            outcome = &mut steps => return outcome,
            _ = tokio::time::sleep_until(next) => {
                if !announced {
                    run.emit::<H>(job_id, JobState::Started, None, None);
                    announced = true;
                } else if progress.has_changed().unwrap_or(false) {
                    let percent = *progress.borrow_and_update();
                    run.emit::<H>(job_id, JobState::Progress, Some(percent), None);
                }
                next += PROGRESS_EVERY;
            }
        }
    }
}

/// [`run_job`]'s steps: on the filesystem backend a source job is prepared, handled and
/// committed in one trip to a blocking thread ([`run_local`]); otherwise (S3, a join of
/// parts) the storage requests go out async around the handler's trip.
async fn run_steps<H: Handler>(
    worker: &Worker<H>,
    job: H::Job,
    run: &Run<'_>,
    cancel: CancellationToken,
    progress: tokio::sync::watch::Sender<f64>,
) -> Outcome {
    // Taken now: a part that finds itself committed still checks its fan-in.
    let fan_in = job.fan_in();
    let handled = if worker.storage.is_local() && matches!(job.inputs(), Inputs::Source) {
        // A whole task may be acked in the trip once committed; a part checks its fan-in
        // first.
        let lone_ack = fan_in
            .is_none()
            .then(|| (run.settlement.clone(), worker.in_flight.clone()));
        run_local(worker, job, run.attempt, lone_ack, cancel, progress).await
    } else {
        // Boxed, as are the other rare or remote paths below: a job's future is moved
        // whole into its task, and unboxed these made it 13 KB for a local job.
        Box::pin(run_remote(worker, job, run.attempt, cancel, progress)).await
    };
    let handled = match handled {
        Ok(handled) => handled,
        Err(skip) => return Box::pin(skipped(worker, skip, run, fan_in)).await,
    };
    let outcome = conclude(worker, run, handled).await;
    match fan_in {
        Some(fan_in) => Box::pin(join_if_last(worker, Some(fan_in), run, outcome)).await,
        None => outcome,
    }
}

/// The outcome of a job that is not run (see [`Skip`]).
async fn skipped<H: Handler>(
    worker: &Worker<H>,
    skip: Skip,
    run: &Run<'_>,
    fan_in: Option<FanIn<H::Job>>,
) -> Outcome {
    match skip {
        Skip::Failed(e) => failed(e),
        Skip::TaskJoined => {
            tracing::info!("the task is already complete; this part is moot");
            Outcome::Duplicate
        }
        Skip::Committed => {
            tracing::info!("outputs already committed by an earlier delivery; skipping");
            // A part that committed but crashed before its fan-in check checks now.
            join_if_last(worker, fan_in, run, Outcome::Duplicate).await
        }
        Skip::Cancelled => {
            tracing::info!("an operator cancelled this job; dropping it");
            Outcome::CancelledByOperator
        }
    }
}

/// How a job's handler run ended, for [`conclude`].
struct Handled<J> {
    /// The job and the handler's result, or its panic.
    joined: Joined<J>,
    /// Whether the time limit cancelled it.
    timed_out: bool,
    /// The commit, if it was already made in the handler's trip (filesystem backend).
    committed: Option<anyhow::Result<Option<crate::manifest::Manifest>>>,
    /// The scratch directory, unless the trip already removed it.
    scratch: Option<tempfile::TempDir>,
    /// When the handler started, for the manifest's duration.
    started: Instant,
}

/// [`run_steps`] on the filesystem backend for a job that reads its source: the checks
/// ([`prepare_local`]), the handler (its scratch directory made if it asks for one) and
/// the commit with the scratch removal, all in one trip to a blocking thread. Each trip
/// costs about as much as the broker's routing of a message, so for a small job the
/// trips, not the broker, would set the pace. Given the delivery's settlement, a commit
/// made while no other job of the worker runs is acked from the trip too
/// ([`Settlement::ack_now`]): the broker need not wait for the async side to wake
/// before it sends the next job.
async fn run_local<H: Handler>(
    worker: &Worker<H>,
    job: H::Job,
    attempt: u32,
    lone_ack: Option<(Settlement, InFlight)>,
    cancel: CancellationToken,
    progress: tokio::sync::watch::Sender<f64>,
) -> Result<Handled<H::Job>, Skip> {
    let lookups = Lookups::of(&job).map_err(Skip::Failed)?;
    let scratch_root = worker.settings.worker.scratch_dir.clone();
    let (storage, handler) = (worker.storage.clone(), worker.handler.clone());
    let (bytes_read, job_seconds) = (
        worker.health.bytes_read.clone(),
        worker.series.job_seconds.clone(),
    );
    let completion = completion_of(worker, &job, attempt);
    // The job's own token (a child of the session's), shared with the handler: the time
    // limit and an operator's cancel fire it.
    let (job_id, job_token) = (job.job_id(), cancel.clone());
    let context = move |input| {
        let scratch = ScratchDir::MakeIn(scratch_root);
        job_context(job_id, attempt, (input, scratch), job_token, progress)
    };
    let span = tracing::Span::current();
    let trip = move || -> Result<Handled<H::Job>, Skip> {
        let _entered = span.enter();
        let input = prepare_local(&storage, &lookups)?;
        bytes_read.inc_by(input.bytes);
        let started = Instant::now();
        let ctx = context(input);
        let result = handler.handle(&job, &ctx);
        observe_handler(&job_seconds, started);
        let committed = match &result {
            Ok(output) if output.fan_out.is_empty() => {
                let committed =
                    storage.commit_blocking(&lookups.prefix, output, completion(started));
                if let (Ok(Some(_)), Some((settlement, in_flight))) = (&committed, &lone_ack)
                    && in_flight.at_most_one()
                {
                    // Committed, so done whatever happens next, and the worker's only job:
                    // the broker sends no more until this ack, so it goes now, without
                    // waiting for the async side to wake. With other jobs running it is
                    // left to `settle`: acks sent from the async side while several jobs
                    // finish leave in one write, and from here each woke lapin's I/O
                    // loop alone (7 % slower at prefetch 50). (The outcome is `Completed`,
                    // which `settle` acks: the settlement's second ack is a no-op.)
                    settlement.ack_now();
                }
                Some(committed)
            }
            _ => None,
        };
        drop(ctx.take_scratch());
        Ok(Handled {
            joined: Ok((job, result)),
            timed_out: false,
            committed,
            scratch: None,
            started,
        })
    };
    let (joined, timed_out) =
        within_time_limit(worker, &cancel, tokio::task::spawn_blocking(trip)).await;
    match joined {
        Ok(handled) => handled.map(|h| Handled { timed_out, ..h }),
        // The panic is the handler's (or a storage step's); the scratch directory went
        // with the unwinding.
        Err(join) => Ok(Handled {
            joined: Err(join),
            timed_out,
            committed: None,
            scratch: None,
            started: Instant::now(),
        }),
    }
}

/// [`run_steps`] where storage is remote or the job reads parts: [`prepare`] async, the
/// handler on a blocking thread, the commit in [`conclude`].
async fn run_remote<H: Handler>(
    worker: &Worker<H>,
    job: H::Job,
    attempt: u32,
    cancel: CancellationToken,
    progress: tokio::sync::watch::Sender<f64>,
) -> Result<Handled<H::Job>, Skip> {
    let ready = prepare(worker, &job).await?;
    worker.health.bytes_read.inc_by(ready.input.bytes);
    let started = Instant::now();
    let Ready {
        scratch,
        input,
        out_dir,
    } = ready;
    let (joined, timed_out) =
        run_handler(worker, job, attempt, cancel, (input, out_dir), progress).await;
    Ok(Handled {
        joined,
        timed_out,
        committed: None,
        scratch: Some(scratch),
        started,
    })
}

/// Turns a handler's run into the job's outcome: publishes a fan-out, commits what is
/// still to commit, and removes the scratch directory if the trip did not.
async fn conclude<H: Handler>(
    worker: &Worker<H>,
    run: &Run<'_>,
    handled: Handled<H::Job>,
) -> Outcome {
    let Handled {
        joined,
        timed_out,
        committed,
        scratch,
        started,
    } = handled;
    let discard = |scratch: Option<tempfile::TempDir>| async move {
        if let Some(scratch) = scratch {
            remove_scratch(scratch).await;
        }
    };
    let (job, output) = match joined {
        Ok((job, Ok(output))) if output.fan_out.is_empty() => (job, output),
        Ok((_, Ok(output))) => {
            discard(scratch).await;
            let exchange = worker.topology.tasks_exchange();
            let fan_out =
                split::publish_all(run.publisher, &exchange, &output.fan_out, run.priority);
            return match Box::pin(fan_out).await {
                Ok(()) => Outcome::FannedOut(output.fan_out.len()),
                Err(e) => failed(e),
            };
        }
        Ok((_, Err(JobError::Cancelled))) if timed_out => {
            discard(scratch).await;
            return Outcome::TimedOut(worker.job_timeout);
        }
        Ok((_, Err(e))) => {
            discard(scratch).await;
            return Outcome::Failed(e);
        }
        Err(join) => {
            discard(scratch).await;
            return failed(anyhow::Error::new(join).context("handler panicked"));
        }
    };
    let committed = match committed {
        Some(committed) => committed,
        None => {
            let completion = completion_of(worker, &job, run.attempt)(started);
            let prefix = job.commit_prefix();
            let committed = Box::pin(worker.storage.commit(&prefix, &output, completion)).await;
            discard(scratch).await;
            committed
        }
    };
    committed_outcome(worker, &job, committed).await
}

/// Removes a job's scratch directory on a blocking thread: a big tree is slow disk work.
async fn remove_scratch(scratch: tempfile::TempDir) {
    let _ = tokio::task::spawn_blocking(move || drop(scratch)).await;
}

/// A part's fan-in check ([`split`]): if it completed the set, the join is
/// published (confirmed) before the part is acked; if that fails, the part is retried,
/// finds itself committed, and checks again. Other outcomes pass through.
async fn join_if_last<H: Handler>(
    worker: &Worker<H>,
    fan_in: Option<FanIn<H::Job>>,
    run: &Run<'_>,
    committed: Outcome,
) -> Outcome {
    if !matches!(committed, Outcome::Completed | Outcome::Duplicate) {
        return committed;
    }
    let Some(fan_in) = fan_in else {
        return committed;
    };
    let exchange = worker.topology.tasks_exchange();
    match split::join_when_complete(
        &worker.storage,
        run.publisher,
        &exchange,
        &fan_in,
        run.priority,
    )
    .await
    {
        Ok(true) => {
            tracing::info!(
                parts = fan_in.awaits.len(),
                "every part is committed; the join is published"
            );
            committed
        }
        Ok(false) => committed,
        Err(e) => failed(e),
    }
}

/// What a job reads, made local: the source or a join's parts.
struct Input {
    source: std::path::PathBuf,
    parts: Vec<crate::handler::CommittedPart>,
    bytes: u64,
}

/// A job ready for its handler.
struct Ready {
    /// Removed when dropped (see [`remove_scratch`]).
    scratch: tempfile::TempDir,
    input: Input,
    /// Empty, inside `scratch`: where the handler writes its outputs.
    out_dir: std::path::PathBuf,
}

/// Why a job is not run.
enum Skip {
    /// A part whose task is already joined (a late redelivery, a replayed dead part of a
    /// job that was re-run whole).
    TaskJoined,
    /// An earlier delivery of this job committed its outputs.
    Committed,
    /// An operator cancelled the task (its marker is in storage, see [`crate::cancel`]).
    Cancelled,
    /// Its input or a manifest could not be read, or another job's manifest is there.
    Failed(anyhow::Error),
}

/// The storage keys [`prepare`] looks at, owned, so a blocking thread can take them.
struct Lookups {
    job_id: Uuid,
    /// Where this job commits.
    prefix: StorageKey,
    /// For a part: its task's prefix, whose manifest makes the part moot.
    task_prefix: Option<StorageKey>,
    source: StorageKey,
    /// The task's cancel marker ([`crate::cancel`]): parts and joins share it.
    cancel_marker: StorageKey,
}

impl Lookups {
    fn of<J: crate::messages::JobMessage>(job: &J) -> anyhow::Result<Self> {
        let prefix = job.commit_prefix();
        Ok(Self {
            job_id: job.job_id(),
            task_prefix: (&prefix != job.output_prefix()).then(|| job.output_prefix().clone()),
            prefix,
            source: job.source().clone(),
            cancel_marker: crate::cancel::marker_key(job.job_id(), J::TASK)?,
        })
    }

    /// A part's first check: is its task already joined?
    fn task_joined(&self, owner: anyhow::Result<Option<Uuid>>) -> Result<(), Skip> {
        let Some(task_prefix) = &self.task_prefix else {
            return Ok(());
        };
        match owner {
            Ok(Some(owner)) => match claim_manifest(owner, self.job_id, task_prefix) {
                Ok(()) => Err(Skip::TaskJoined),
                Err(e) => Err(Skip::Failed(e)),
            },
            Ok(None) => Ok(()),
            Err(e) => Err(Skip::Failed(e.context("checking for the task's manifest"))),
        }
    }

    /// Whether the job still has to run, from its own manifest's owner, its task's cancel
    /// marker and its input. A committed manifest wins over a cancel marker (see
    /// [`crate::cancel`]), and a cancelled job needs no input. A permanent source problem
    /// (missing object, no such bucket) decides before an unreadable manifest, which
    /// would only make the job retry in vain.
    fn still_to_run(
        &self,
        owner: anyhow::Result<Option<Uuid>>,
        cancelled: anyhow::Result<bool>,
        input: anyhow::Result<Input>,
    ) -> Result<Input, Skip> {
        match (owner, cancelled, input) {
            (Ok(Some(owner)), _, _) => match claim_manifest(owner, self.job_id, &self.prefix) {
                Ok(()) => Err(Skip::Committed),
                Err(e) => Err(Skip::Failed(e)),
            },
            (_, Ok(true), _) => Err(Skip::Cancelled),
            (_, _, Err(e)) => Err(Skip::Failed(e)),
            (Err(e), _, Ok(_)) => Err(Skip::Failed(e.context("checking for an existing manifest"))),
            (Ok(None), Err(e), Ok(_)) => {
                Err(Skip::Failed(e.context("checking for a cancel marker")))
            }
            (Ok(None), Ok(false), Ok(input)) => Ok(input),
        }
    }
}

/// Before the handler: is the job still to do, and if so its input and scratch.
/// Idempotence: a redelivered job whose manifest exists is already done. On S3 (and for a
/// join, which reads many parts) the requests go out async, the input lookup alongside
/// the manifest check; on the filesystem backend a source job takes [`prepare_local`].
async fn prepare<H: Handler>(worker: &Worker<H>, job: &H::Job) -> Result<Ready, Skip> {
    let lookups = Lookups::of(job).map_err(Skip::Failed)?;
    let scratch_root = worker.settings.worker.scratch_dir.clone();
    let storage = worker.storage.clone();
    if let Some(task_prefix) = &lookups.task_prefix {
        lookups.task_joined(storage.manifest_owner(task_prefix).await)?;
    }
    let scratch = tokio::task::spawn_blocking(move || make_scratch(&scratch_root))
        .await
        .unwrap_or_else(|join| {
            Err(anyhow::Error::new(join).context("creating a scratch directory panicked"))
        })
        .map_err(Skip::Failed)?;
    let fetch = async {
        match job.inputs() {
            Inputs::Source => storage
                .fetch(job.source(), scratch.0.path())
                .await
                .map(|s| Input {
                    source: s.path,
                    parts: Vec::new(),
                    bytes: s.size,
                }),
            Inputs::Parts(prefixes) => split::fetch_parts(&storage, &prefixes, scratch.0.path())
                .await
                .map(|(parts, bytes)| Input {
                    source: std::path::PathBuf::new(),
                    parts,
                    bytes,
                }),
        }
    };
    let cancelled = storage.exists(&lookups.cancel_marker);
    let (owner, cancelled, input) =
        tokio::join!(storage.manifest_owner(&lookups.prefix), cancelled, fetch);
    match lookups.still_to_run(owner, cancelled, input) {
        Ok(input) => Ok(Ready {
            scratch: scratch.0,
            input,
            out_dir: scratch.1,
        }),
        Err(skip) => {
            remove_scratch(scratch.0).await;
            Err(skip)
        }
    }
}

/// [`prepare`] on the filesystem backend for a source job, synchronously (in
/// [`run_local`]'s trip): only the checks. The source is read in place, and the handler
/// makes its scratch directory when it first writes ([`ScratchDir::MakeIn`]).
fn prepare_local(storage: &Storage, lookups: &Lookups) -> Result<Input, Skip> {
    if let Some(task_prefix) = &lookups.task_prefix {
        lookups.task_joined(storage.manifest_owner_blocking(task_prefix))?;
    }
    let (owner, cancelled) =
        storage.owner_and_exists_blocking(&lookups.prefix, &lookups.cancel_marker);
    let input = storage
        .local_source_blocking(&lookups.source)
        .map(|s| Input {
            source: s.path,
            parts: Vec::new(),
            bytes: s.size,
        });
    lookups.still_to_run(owner, cancelled, input)
}

/// A job's scratch directory (`job-*` under `worker.scratch_dir`) and the empty output
/// directory inside it.
fn make_scratch(root: &std::path::Path) -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf)> {
    let scratch = crate::handler::new_scratch(root)?;
    let out_dir = scratch.path().join("out");
    std::fs::create_dir(&out_dir).context("creating the output directory")?;
    Ok((scratch, out_dir))
}

/// What [`run_handler`] gives back: the job and the handler's result, or the panic.
type Joined<J> = Result<(J, Result<TaskOutput, JobError>), tokio::task::JoinError>;

/// Runs the handler on a blocking thread within the job's time limit, its progress
/// into `progress`; how it ended, and whether the time limit cancelled it.
async fn run_handler<H: Handler>(
    worker: &Worker<H>,
    job: H::Job,
    attempt: u32,
    cancel: CancellationToken,
    (input, out_dir): (Input, std::path::PathBuf),
    progress: tokio::sync::watch::Sender<f64>,
) -> (Joined<H::Job>, bool) {
    let ctx = job_context(
        job.job_id(),
        attempt,
        (input, ScratchDir::Ready(out_dir)),
        cancel.clone(),
        progress,
    );
    let (handler, job_seconds) = (worker.handler.clone(), worker.series.job_seconds.clone());
    let span = tracing::Span::current();
    let handle = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let started = Instant::now();
        let result = handler.handle(&job, &ctx);
        observe_handler(&job_seconds, started);
        (job, result)
    });
    within_time_limit(worker, &cancel, handle).await
}

/// The context a handler runs with: its input, its empty output directory, the token
/// that stops it and where its progress goes.
fn job_context(
    job_id: Uuid,
    attempt: u32,
    (input, scratch): (Input, ScratchDir),
    token: CancellationToken,
    progress: tokio::sync::watch::Sender<f64>,
) -> JobContext {
    let mut ctx = JobContext::new(
        job_id,
        attempt,
        input.source,
        scratch,
        token,
        Arc::new(move |p| {
            let _ = progress.send(p);
        }),
    );
    ctx.parts = input.parts;
    ctx
}

/// Waits for a job's blocking trip; past the job's time limit, cancels `token` (the
/// handler's) and waits for the trip to stop. Whether the limit struck.
async fn within_time_limit<H: Handler, T>(
    worker: &Worker<H>,
    token: &CancellationToken,
    mut trip: tokio::task::JoinHandle<T>,
) -> (Result<T, tokio::task::JoinError>, bool) {
    tokio::select! {
        joined = &mut trip => (joined, false),
        _ = tokio::time::sleep(worker.job_timeout) => {
            tracing::warn!(limit = ?worker.job_timeout, "job exceeded its time limit; cancelling it");
            token.cancel();
            (trip.await, true)
        }
    }
}

/// Records how long a handler ran.
fn observe_handler(job_seconds: &Histogram, started: Instant) {
    job_seconds.observe(started.elapsed().as_secs_f64());
}

/// The manifest record of `job`'s completion by this worker, once its handler (started
/// at the given instant) is done.
fn completion_of<H: Handler>(
    worker: &Worker<H>,
    job: &H::Job,
    attempt: u32,
) -> impl FnOnce(Instant) -> Completion + Send + 'static {
    let (job_id, source, name) = (job.job_id(), job.source().clone(), worker.name.clone());
    move |started| Completion {
        schema: messages::SCHEMA_VERSION,
        job_id,
        task: H::Job::TASK.to_owned(),
        source,
        worker: name,
        attempt,
        completed_at: now_rfc3339(),
        duration_s: started.elapsed().as_secs_f64(),
    }
}

/// The outcome of a commit: completed, or (having lost the commit race to another
/// delivery of the same job) a duplicate, which still counts as done.
async fn committed_outcome<H: Handler>(
    worker: &Worker<H>,
    job: &H::Job,
    committed: anyhow::Result<Option<crate::manifest::Manifest>>,
) -> Outcome {
    let prefix = job.commit_prefix();
    match committed {
        Ok(Some(written)) => {
            worker.health.bytes_written.inc_by(written.output_bytes());
            if let Inputs::Parts(parts) = job.inputs() {
                // Joined: the parts have served. A late part now finds the task's
                // manifest and is moot, so removing them cannot lose work.
                for part in parts {
                    worker.storage.remove_prefix(&part).await;
                }
            }
            Outcome::Completed
        }
        // Someone committed first: fine if it was another delivery of this job.
        Ok(None) => match worker.storage.manifest_owner(&prefix).await {
            Ok(Some(owner)) => match claim_manifest(owner, job.job_id(), &prefix) {
                Ok(()) => {
                    tracing::info!(
                        "another delivery of this job committed first; keeping its result"
                    );
                    Outcome::Duplicate
                }
                Err(e) => failed(e),
            },
            Ok(None) => failed(anyhow::anyhow!(
                "the manifest that won the commit race has disappeared"
            )),
            Err(e) => failed(e.context("reading the manifest that won the commit race")),
        },
        Err(e) => failed(e),
    }
}

/// The one conversion of the runtime's own failures (storage's included) into a job's
/// outcome: markers decide ([`JobError::classify`]), the cause chain is the reason.
fn failed(err: anyhow::Error) -> Outcome {
    Outcome::Failed(JobError::classify(err))
}

/// Whether a manifest found under this job's output prefix, committed by job `owner`,
/// may count as this job's result: only if it names this job. A message that points its `output_prefix` at
/// another job's outputs must not be "skipped" as done with that job's results (nor be
/// reported complete when it lost the commit race to them): it is refused, permanently.
///
/// A `manifest.json` there that is not a manifest at all (no job recorded) never gets
/// this far: reading it is an [`crate::manifest::UnreadableManifest`] error, permanent
/// as well.
fn claim_manifest(owner: Uuid, job_id: Uuid, prefix: &StorageKey) -> anyhow::Result<()> {
    if owner == job_id {
        return Ok(());
    }
    Err(crate::outcome::permanent(format!(
        "output prefix `{prefix}` already holds the committed outputs of job {owner}, not of \
         this job {job_id}; a job may only write under its own output prefix"
    )))
}

/// Carries out the decided action on the broker.
async fn settle<H: Handler>(
    worker: &Worker<H>,
    delivery: &Delivery,
    job_id: Uuid,
    outcome: &Outcome,
    run: &Run<'_>,
) {
    let parked = Parked {
        delivery,
        job_id,
        run,
    };
    match decide(outcome, run.attempt, &worker.policy) {
        Action::Ack => {
            run.settlement.ack();
            worker.series.completed.inc();
            // `completed` is the task's, sent once: not for a part (its 100 % is
            // progress of the task), not for a duplicate (the first delivery sent it).
            match outcome {
                Outcome::Duplicate => tracing::info!("job was already done"),
                Outcome::FannedOut(parts) => {
                    tracing::info!(parts, "job split into parts");
                    run.emit::<H>(
                        job_id,
                        JobState::Progress,
                        Some(0.0),
                        Some(format!("split into {parts} parts")),
                    );
                }
                _ if run.part.is_some() => {
                    tracing::info!("part completed");
                    run.emit::<H>(job_id, JobState::Progress, Some(100.0), None);
                }
                _ => {
                    tracing::info!("job completed");
                    run.emit::<H>(job_id, JobState::Completed, Some(100.0), None);
                }
            }
        }
        Action::Discard => {
            tracing::info!("job cancelled by an operator; acked, not retried");
            run.settlement.ack();
            worker.series.cancelled.inc();
            run.emit::<H>(
                job_id,
                JobState::Cancelled,
                None,
                Some("cancelled by an operator".into()),
            );
        }
        Action::Requeue => {
            tracing::info!("job cancelled; returning it to the queue");
            Box::pin(run.settlement.nack_requeue()).await;
            worker.series.requeued.inc();
        }
        Action::Retry {
            tier,
            attempt: next,
            reason,
        } => {
            Box::pin(retry(worker, parked, tier, next, reason)).await;
        }
        Action::Dead { reason } => {
            Box::pin(dead(worker, parked, reason)).await;
        }
    }
}

/// What [`retry`] and [`dead`] need of the delivery they park.
struct Parked<'a> {
    delivery: &'a Delivery,
    job_id: Uuid,
    /// The run that just failed (its attempt, part, channels).
    run: &'a Run<'a>,
}

impl Parked<'_> {
    /// The reason as people read it: a part's failure names the part, so a dead
    /// segment says which one made its transcode dead.
    fn reason(&self, reason: String) -> String {
        match self.run.part {
            Some(part) => format!("{}: {reason}", part.label()),
            None => reason,
        }
    }
}

/// Parks the delivery in retry tier `tier` as attempt `next`, with the reason.
async fn retry<H: Handler>(
    worker: &Worker<H>,
    p: Parked<'_>,
    tier: usize,
    next: u32,
    reason: String,
) {
    let task = H::Job::TASK;
    let reason = p.reason(reason);
    tracing::warn!(error = %reason, retry_in = %crate::topology::delay_label(worker.policy.delays[tier]), "job failed; will retry");
    p.run
        .emit::<H>(p.job_id, JobState::Failed, None, Some(reason.clone()));
    let mut headers = original_headers(p.delivery);
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(next as i32));
    headers.insert(LAST_ERROR_HEADER.into(), long_string(&reason));
    headers.insert(WORKER_HEADER.into(), long_string(&worker.name));
    let target = worker.topology.retry(tier);
    if park(
        p.run.publisher,
        p.run.settlement,
        &p.delivery.data,
        &target,
        // The tier dead-letters it back with this key: a retry keeps its priority.
        &p.run.priority.routing_key(task),
        headers,
        "for retry",
    )
    .await
    {
        worker.series.retried.inc();
        worker.series.retries.inc();
        p.run
            .emit::<H>(p.job_id, JobState::Retrying, None, Some(reason));
    }
}

/// Parks the delivery in the dead-letter queue with the reason.
async fn dead<H: Handler>(worker: &Worker<H>, p: Parked<'_>, reason: String) {
    let task = H::Job::TASK;
    let reason = p.reason(reason);
    tracing::error!(error = %reason, "job is dead; parking it in the dead-letter queue");
    p.run
        .emit::<H>(p.job_id, JobState::Failed, None, Some(reason.clone()));
    let mut headers = original_headers(p.delivery);
    headers.insert(REASON_HEADER.into(), long_string(&reason));
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongInt(p.run.attempt as i32),
    );
    headers.insert(WORKER_HEADER.into(), long_string(&worker.name));
    headers.insert(FAILED_AT_HEADER.into(), long_string(&now_rfc3339()));
    headers.insert(TASK_HEADER.into(), long_string(task));
    let body = dead_body(&p.delivery.data, &mut headers);
    let dead = worker.topology.dead();
    if park(
        p.run.publisher,
        p.run.settlement,
        body,
        &dead,
        // `producer dead replay` routes by it: a replayed job keeps its priority.
        &p.run.priority.routing_key(task),
        headers,
        "in the dead-letter queue",
    )
    .await
    {
        worker.series.dead.inc();
        worker.series.dead_letters.inc();
        p.run
            .emit::<H>(p.job_id, JobState::Dead, None, Some(reason));
    }
}

/// The body a dead letter keeps: the whole body up to the message limit; past it (an
/// oversize message is poison) only its first [`messages::MAX_MESSAGE_BYTES`], with
/// [`TRUNCATED_FROM_HEADER`] saying how big it was.
fn dead_body<'a>(body: &'a [u8], headers: &mut FieldTable) -> &'a [u8] {
    if body.len() <= messages::MAX_MESSAGE_BYTES {
        return body;
    }
    headers.insert(
        TRUNCATED_FROM_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(body.len()).unwrap_or(i64::MAX)),
    );
    &body[..messages::MAX_MESSAGE_BYTES]
}

/// Moves a delivery to `exchange`: publish `body` (the delivery's own, or a cut of it)
/// with `headers` and wait for the broker's confirm, then ack the original. If the
/// publish fails the original is requeued instead, so the job is never lost (at worst it
/// runs again). True if parked.
async fn park(
    publisher: &Channel,
    settlement: &Settlement,
    body: &[u8],
    exchange: &str,
    routing_key: &str,
    headers: FieldTable,
    where_to: &str,
) -> bool {
    let props = broker::persistent_json(headers);
    match broker::publish_confirmed(publisher, exchange, routing_key, body, props).await {
        Ok(()) => {
            settlement.ack();
            true
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "could not park the job {where_to}; requeueing it instead");
            settlement.nack_requeue().await;
            false
        }
    }
}

/// Jobs are JSON: a message that says it is something else is poison. (No content type
/// at all is accepted, for hand-published messages from the management UI.)
fn check_content_type(delivery: &Delivery) -> Result<(), messages::PoisonError> {
    match delivery.properties.content_type() {
        Some(ct) if ct.as_str() != "application/json" => {
            Err(messages::PoisonError::Invalid(format!(
                "content type `{}` is not application/json",
                ct.as_str().chars().take(100).collect::<String>()
            )))
        }
        _ => Ok(()),
    }
}

/// The 1-based attempt number this delivery carries (1 when absent or malformed).
pub fn attempt_of(delivery: &Delivery) -> u32 {
    header_u32(delivery.properties.headers().as_ref(), ATTEMPT_HEADER)
        .unwrap_or(1)
        .max(1)
}

/// Reads an integer header of any AMQP integer type.
pub fn header_u32(headers: Option<&FieldTable>, name: &str) -> Option<u32> {
    let value = headers?.inner().get(name)?;
    let n: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// Reads a string header.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn original_headers(delivery: &Delivery) -> FieldTable {
    delivery.properties.headers().clone().unwrap_or_default()
}

/// Header strings are bounded: an error message may quote hostile input.
fn long_string(s: &str) -> AMQPValue {
    let bounded: String = s.chars().take(2000).collect();
    AMQPValue::LongString(LongString::from(bounded.into_bytes()))
}

/// Best-effort job id of an unparseable message, for logs and events.
fn loose_job_id(body: &[u8]) -> Uuid {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("job_id")?.as_str()?.parse().ok())
        .unwrap_or(Uuid::nil())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_bodies_are_cut_to_the_message_limit_and_say_so() {
        let mut headers = FieldTable::default();
        let small = vec![b'x'; messages::MAX_MESSAGE_BYTES];
        assert_eq!(dead_body(&small, &mut headers).len(), small.len());
        assert!(headers.inner().get(TRUNCATED_FROM_HEADER).is_none());

        let big = vec![b'x'; 300 * 1024];
        let kept = dead_body(&big, &mut headers);
        assert_eq!(kept.len(), messages::MAX_MESSAGE_BYTES);
        assert_eq!(
            header_u32(Some(&headers), TRUNCATED_FROM_HEADER),
            Some(300 * 1024)
        );
    }

    #[test]
    fn an_existing_manifest_counts_only_for_its_own_job() {
        let prefix = StorageKey::new("outputs/a/transcode/").unwrap();
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(claim_manifest(mine, mine, &prefix).is_ok());

        let err = claim_manifest(mine, other, &prefix).unwrap_err();
        let JobError::Permanent(reason) = JobError::classify(err) else {
            panic!("another job's manifest must be refused permanently");
        };
        assert!(
            reason.contains(&mine.to_string()) && reason.contains(&other.to_string()),
            "{reason}"
        );
    }
}
