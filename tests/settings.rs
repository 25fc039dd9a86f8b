//! Integration tests: a misspelled setting stops every binary at start, naming the key,
//! where it was set and the nearest valid key; another binary's section does not.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{TestEnv, bin};

/// A process that stops on a bad setting does so at once; one that does not is killed.
const AT_ONCE: Duration = Duration::from_secs(15);

/// Each binary as an operator starts it: the workers as they are, the producer with a
/// command that would go to the broker.
const BINARIES: [(&str, &[&str]); 3] = [
    ("transcoder", &[]),
    ("thumbnailer", &[]),
    (
        "producer",
        &["status", "00000000-0000-4000-8000-000000000000"],
    ),
];

/// Runs `binary args` in `env`'s world plus `extra`, until it exits, its stderr shows
/// `until`, or `AT_ONCE` passes; returns how it ended (`None`: still running, killed) and
/// its stderr.
fn run(
    env: &TestEnv,
    binary: &str,
    args: &[&str],
    extra: &[(&str, &str)],
    until: Option<&str>,
) -> (Option<ExitStatus>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(bin(binary))
        .args(args)
        .envs(env.env_vars())
        .envs(extra.iter().copied())
        .env("VIDPIPE__HEALTH__ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + AT_ONCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        let seen = until.is_some_and(|u| {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(u)
        });
        if seen || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// `VIDPIPE__WORKER__CONCURENCY=4` stops the workers and the producer with exit code 2
/// and a message naming the variable and `worker.concurrency`.
#[tokio::test]
async fn a_misspelled_environment_variable_stops_every_binary_naming_it() {
    let env = TestEnv::new().await;
    for (binary, args) in BINARIES {
        let (status, stderr) = run(
            &env,
            binary,
            args,
            &[("VIDPIPE__WORKER__CONCURENCY", "4")],
            None,
        );
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{binary}: {stderr}");
        assert!(
            stderr.contains(
                "unknown setting `worker.concurency` (from VIDPIPE__WORKER__CONCURENCY); \
                 did you mean `worker.concurrency`?"
            ),
            "{binary}: {stderr}"
        );
    }
}

/// A settings file with a `[wroker]` section stops the workers and the producer with exit
/// code 2 and a message naming the key, the file and `worker.concurrency`.
#[tokio::test]
async fn a_misspelled_file_section_stops_every_binary_naming_it() {
    let env = TestEnv::new().await;
    let file = env.data.path().join("vidpipe.toml");
    std::fs::write(&file, "[wroker]\nconcurrency = 4\n").unwrap();
    let file = file.to_str().unwrap();
    for (binary, args) in BINARIES {
        let args: Vec<&str> = ["--config", file].iter().chain(args).copied().collect();
        let (status, stderr) = run(&env, binary, &args, &[], None);
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{binary}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "unknown setting `wroker.concurrency` (from {file}); did you mean `worker.concurrency`?"
            )),
            "{binary}: {stderr}"
        );
    }
}

/// One settings file serves every binary: the transcoder starts with the thumbnailer's
/// section in it, the producer with both workers' sections, and the compose file's
/// one-underscore variables (`VIDPIPE_MEDIA`) are not settings.
#[tokio::test]
async fn another_binarys_section_is_not_unknown() {
    let env = TestEnv::new().await;
    let file = env.data.path().join("vidpipe.toml");
    std::fs::write(
        &file,
        "[transcoder]\npreset = \"fast\"\n[thumbnailer]\nmax_sheet_height = 2048\n\
         [media]\nmax_width = 1920\n",
    )
    .unwrap();
    let compose = [
        ("VIDPIPE_MEDIA", "./media"),
        ("VIDPIPE_TRANSCODER_CONCURRENCY", "2"),
    ];
    let file = file.to_str().unwrap();
    // Still running when killed: it got past its settings to the broker.
    let (status, stderr) = run(
        &env,
        "transcoder",
        &["--config", file],
        &compose,
        Some("connected to the broker"),
    );
    assert!(status.is_none(), "{status:?}: {stderr}");
    assert!(stderr.contains("connected to the broker"), "{stderr}");
    let (status, stderr) = run(
        &env,
        "producer",
        &[
            "--config",
            file,
            "status",
            "00000000-0000-4000-8000-000000000000",
        ],
        &compose,
        None,
    );
    assert!(!stderr.contains("unknown setting"), "{stderr}");
    assert_ne!(status.and_then(|s| s.code()), Some(2), "{stderr}");
}
