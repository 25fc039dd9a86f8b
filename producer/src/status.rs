//! `producer status JOB_ID`: each task's state. Completed is the presence of its
//! manifest (`outputs/<job_id>/<task>/manifest.json`, written last by the worker); dead is
//! a message of the job in the parking lot (looked at, never taken out); cancelled is a
//! cancel marker (`outputs/<job_id>/<task>/cancelled.json`); anything else is
//! pending (queued, running or waiting for a retry), with the segments done of a transcode
//! split into segments (from the parts' manifests).

use serde::Serialize;
use shared::manifest::{Manifest, ManifestOutput};
use shared::settings::Settings;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::tasks::BUILTIN_NAMES as TASKS;
use uuid::Uuid;

use crate::cli::StatusArgs;
use crate::dead::{self, DeadInfo};
use crate::exit::Failure;
use crate::publisher::Broker;

/// One task's state.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum TaskStatus {
    Completed {
        manifest: String,
        outputs: Vec<ManifestOutput>,
        /// Renditions asked for but not made because they would upscale the source.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        dropped_renditions: Vec<String>,
    },
    Dead(DeadInfo),
    /// Cancelled by an operator (`producer cancel`): its marker is in storage.
    Cancelled {
        marker: String,
        requested_at: String,
        requested_by: String,
    },
    /// Queued, running or waiting for a retry; for a transcode split into segments, how
    /// many of them are done.
    Pending {
        #[serde(skip_serializing_if = "Option::is_none")]
        segments: Option<crate::wait::SegmentsDone>,
    },
}

/// How many segments of a split task are committed, of how many: read from the parts'
/// manifests (`parts/<plan>/seg-NNNNN/manifest.json`), the record that survives any
/// lost event. `None` if the task is not split (or no segment is done yet).
async fn segments_done(
    storage: &Storage,
    prefix: &StorageKey,
) -> anyhow::Result<Option<crate::wait::SegmentsDone>> {
    let parts = prefix.join("parts/")?;
    let mut per_plan: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for key in storage.list(&parts).await? {
        let rest = key.strip_prefix(parts.as_str()).unwrap_or(&key);
        if let [plan, seg, "manifest.json"] = rest.split('/').collect::<Vec<_>>()[..]
            && seg.starts_with("seg-")
        {
            per_plan
                .entry(plan.to_owned())
                .or_default()
                .push(format!("{}{plan}/{seg}/", parts.as_str()));
        }
    }
    // Two plans of one job only happen after a redelivery to other settings: show the
    // one further along.
    let Some(done) = per_plan.into_values().max_by_key(Vec::len) else {
        return Ok(None);
    };
    let Some(manifest) = storage.manifest(&StorageKey::new(done[0].clone())?).await? else {
        return Ok(None);
    };
    let of = manifest
        .summary
        .pointer("/part/segments")
        .and_then(serde_json::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    Ok(of.map(|of| crate::wait::SegmentsDone {
        done: u32::try_from(done.len()).unwrap_or(u32::MAX),
        of,
    }))
}

/// One task's lines of `producer status`.
fn print_task(task: &str, status: &TaskStatus) {
    match status {
        TaskStatus::Completed {
            manifest,
            outputs,
            dropped_renditions,
        } => {
            crate::say!(
                "  {task:<10} completed ({} outputs, {manifest}){}",
                outputs.len(),
                dropped_note(dropped_renditions)
            );
            for o in outputs {
                crate::say!("               {}  {} bytes", o.key, o.size_bytes);
            }
        }
        TaskStatus::Dead(d) => crate::say!(
            "  {task:<10} dead after {} attempt(s){}{}: {}",
            d.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into()),
            d.worker
                .as_ref()
                .map(|w| format!(" on {w}"))
                .unwrap_or_default(),
            d.failed_at
                .as_deref()
                .map(|t| format!(" at {}", dead::shown_time(t)))
                .unwrap_or_default(),
            d.reason
        ),
        TaskStatus::Cancelled {
            requested_at,
            requested_by,
            ..
        } => crate::say!(
            "  {task:<10} cancelled{}{}",
            Some(requested_by)
                .filter(|b| !b.is_empty())
                .map(|b| format!(" by {b}"))
                .unwrap_or_default(),
            Some(requested_at)
                .filter(|t| !t.is_empty())
                .map(|t| format!(" at {}", dead::shown_time(t)))
                .unwrap_or_default(),
        ),
        TaskStatus::Pending { segments: None } => {
            crate::say!("  {task:<10} pending (queued, running or waiting for a retry)")
        }
        TaskStatus::Pending { segments: Some(s) } => crate::say!(
            "  {task:<10} running: split into {} segments, segments done {}/{}",
            s.of,
            s.done,
            s.of
        ),
    }
}

/// The renditions a transcode manifest lists as asked for but not made (the transcoder
/// never upscales); empty for any other manifest.
pub fn dropped_renditions(manifest: &Manifest) -> Vec<String> {
    manifest
        .summary
        .pointer("/dropped_renditions")
        .and_then(|d| d.as_array())
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `; not made: 720p (larger than the source; the ladder never upscales)`, or nothing.
pub fn dropped_note(dropped: &[String]) -> String {
    if dropped.is_empty() {
        return String::new();
    }
    format!(
        "; not made: {} (larger than the source; the ladder never upscales)",
        dropped.join(", ")
    )
}

/// Every task of a job: completed (a manifest wins over everything, see
/// `shared::cancel`), else cancelled (a marker), else dead (parked), else pending.
pub async fn job_status(
    storage: &Storage,
    broker: &Broker,
    job_id: Uuid,
) -> anyhow::Result<Vec<(&'static str, TaskStatus)>> {
    let mut out = Vec::new();
    let mut parked: Option<Vec<DeadInfo>> = None;
    for task in TASKS {
        let prefix = StorageKey::output_prefix(job_id, task)?;
        if let Some(manifest) = storage.manifest(&prefix).await? {
            out.push((
                task,
                TaskStatus::Completed {
                    manifest: Storage::manifest_key(&prefix).to_string(),
                    dropped_renditions: dropped_renditions(&manifest),
                    outputs: manifest.outputs,
                },
            ));
            continue;
        }
        if let Some(m) = shared::cancel::marker(storage, job_id, task).await? {
            out.push((
                task,
                TaskStatus::Cancelled {
                    marker: shared::cancel::marker_key(job_id, task)?.to_string(),
                    requested_at: m.requested_at,
                    requested_by: m.requested_by,
                },
            ));
            continue;
        }
        if parked.is_none() {
            parked = Some(dead::of_job(broker, job_id).await?);
        }
        let dead = parked
            .as_ref()
            .and_then(|p| p.iter().rev().find(|d| d.task.as_deref() == Some(task)));
        out.push((
            task,
            match dead {
                Some(d) => TaskStatus::Dead(d.clone()),
                None => TaskStatus::Pending {
                    segments: segments_done(storage, &prefix).await?,
                },
            },
        ));
    }
    Ok(out)
}

/// The job's uploaded files, or the "no such job" failure when nothing of it exists:
/// no upload, no manifest, no cancel marker, nothing parked.
pub async fn known_job(
    storage: &Storage,
    broker: &Broker,
    job_id: Uuid,
    tasks: &[(&'static str, TaskStatus)],
) -> Result<Vec<String>, Failure> {
    let uploads = StorageKey::new(format!("uploads/{job_id}/")).expect("a uuid makes a valid key");
    let uploaded = storage.list(&uploads).await.map_err(Failure::Infra)?;
    let known = !uploaded.is_empty()
        || tasks
            .iter()
            .any(|(_, s)| !matches!(s, TaskStatus::Pending { .. }));
    if !known {
        return Err(Failure::JobsFailed(format!(
            "no job {job_id}: nothing under {uploads} in storage (setting `storage.root`), no \
             manifests, nothing parked in `{}`",
            broker.topology.dead()
        )));
    }
    Ok(uploaded)
}

/// Opens storage as the settings say, as infrastructure trouble naming the settings.
pub fn open_storage(settings: &Settings) -> Result<Storage, Failure> {
    Storage::from_settings(&settings.storage).map_err(|e| {
        Failure::Infra(
            e.context("opening storage (settings `storage.*`, e.g. VIDPIPE__STORAGE__ROOT)"),
        )
    })
}

/// `producer status`.
pub async fn run(settings: &Settings, args: StatusArgs) -> Result<(), Failure> {
    let job_id = crate::parse_job_id(&args.job_id)?;
    let storage = open_storage(settings)?;
    let broker = Broker::connect(settings).await?;
    let tasks = job_status(&storage, &broker, job_id)
        .await
        .map_err(Failure::Infra)?;
    let uploaded = known_job(&storage, &broker, job_id, &tasks).await?;
    if args.json {
        let tasks: serde_json::Map<String, serde_json::Value> = tasks
            .iter()
            .map(|(t, s)| ((*t).to_owned(), serde_json::to_value(s).expect("JSON")))
            .collect();
        crate::say!(
            "{}",
            serde_json::json!({ "job_id": job_id, "source": uploaded.first(), "tasks": tasks })
        );
        return Ok(());
    }
    crate::say!("job {job_id}");
    if let Some(source) = uploaded.first() {
        crate::say!("  source     {source}");
    }
    for (task, status) in &tasks {
        print_task(task, status);
    }
    Ok(())
}
