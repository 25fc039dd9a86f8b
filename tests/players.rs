//! CMAF output in real players: hls.js and dash.js in Debian's headless Chromium
//! (`tests/players/play.mjs`, driven by playwright-core; `scripts/setup.sh` installs the
//! `chromium` package and the pinned npm packages). Each player starts on a codec's
//! lowest rendition, is forced onto its highest, and must keep playing; both renditions'
//! segments and the audio rendition's must have been fetched.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::cmaf::{cmaf_dir, two_rendition_cmaf};
use crate::support::TestEnv;

/// The node to run the player with: the node 20 `scripts/setup.sh` put in
/// `~/.cache/vidpipe-node` where the machine's own was older (Debian 12's is 18), else the
/// machine's.
fn node() -> PathBuf {
    let cached = std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".cache/vidpipe-node/node_modules"))
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("node-linux-"))
        .map(|e| e.path().join("bin/node"))
        .find(|bin| bin.is_file());
    cached.unwrap_or_else(|| "node".into())
}

/// Plays `dir`'s `codec` renditions (`avc1`, `av01`) through `player` (`hls` or
/// `dash`); the script's report.
fn play(dir: &Path, player: &str, codec: &str) -> Value {
    let players = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/players");
    assert!(
        players.join("node_modules/playwright-core").is_dir(),
        "the player test needs its npm packages: run scripts/setup.sh"
    );
    let out = Command::new(node())
        .arg(players.join("play.mjs"))
        .arg(dir)
        .arg(player)
        .arg(codec)
        .output()
        .expect("the player test needs node (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "play.mjs {player} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "play.mjs {player} printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Asserts the report shows playback going on after a switch from rendition `low` to
/// `high` (both rendered, `high` last), with segments of both and of the audio rendition
/// fetched.
fn assert_played_and_switched(report: &Value, low: &str, high: &str) {
    let what = format!("{} {}", report["player"], report["codec"]);
    assert_eq!(report["errors"], serde_json::json!([]), "{what}: {report}");
    assert_eq!(report["levels"], 2, "{what}: {report}");
    let switched = report["switched_at_s"].as_f64().expect("switched");
    let played = report["played_s"].as_f64().unwrap();
    assert!(
        switched >= 2.0 && played >= switched + 2.0,
        "{what}: playback did not advance past the switch: {report}"
    );
    let rendered: Vec<&str> = report["renditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        rendered.last() == Some(&high) && rendered[..rendered.len() - 1].contains(&low),
        "{what}: rendered {rendered:?}, not {low} then {high}"
    );
    let fetched = |dir: &str| {
        report["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .filter(|r| r.starts_with(dir) && r.ends_with(".m4s"))
            .count()
    };
    for dir in [
        format!("video/{low}/"),
        format!("video/{high}/"),
        "audio/".into(),
    ] {
        assert!(
            fetched(&dir) >= 1,
            "{what}: no {dir} segment fetched: {report}"
        );
    }
}

/// H.264 and AV1 CMAF (one job, a ladder of each) play through hls.js and through
/// dash.js, each switching from its 180p to its 360p rendition midway. (HEVC needs a
/// hardware decoder in Chromium; `cmaf::` decodes it with FFmpeg instead.)
#[tokio::test]
async fn h264_and_av1_cmaf_play_in_hls_js_and_dash_js_across_a_rendition_switch() {
    let mut env = TestEnv::new().await;
    // 2 s segments: the switch lands within a few seconds of playback.
    let settings = [("VIDPIPE__TRANSCODER__HLS_SEGMENT_S", "2")];
    let manifest = two_rendition_cmaf(&mut env, 10, &["h264", "av1"], &["cmaf"], &settings).await;
    let dir = cmaf_dir(&env, &manifest);
    for (codec, low, high) in [("avc1", "180p", "360p"), ("av01", "180p.av1", "360p.av1")] {
        for player in ["hls", "dash"] {
            assert_played_and_switched(&play(&dir, player, codec), low, high);
        }
    }
}
