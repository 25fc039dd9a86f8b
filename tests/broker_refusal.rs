//! Integration tests: what a wrong password looks like to an operator. The producer stops
//! with exit code 3 naming the user and the vhost; a worker keeps trying, says so once per
//! attempt in our words, and connects as soon as the password is right. Never the
//! password itself, never lapin's raw ERROR lines, and no colour codes in a log file.

use std::process::Command;
use std::time::Duration;

use uuid::Uuid;

use crate::support::{TestEnv, bin, eventually};

const PATIENCE: Duration = Duration::from_secs(30);

/// A broker user of this test's own (full rights on `/`), deleted on drop.
struct TestUser {
    name: String,
}

impl TestUser {
    fn create(password: &str) -> Self {
        let user = Self {
            name: format!(
                "vidpipe-refused-{}",
                &Uuid::new_v4().simple().to_string()[..8]
            ),
        };
        user.ctl(&["add_user", &user.name, password]);
        user.ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    fn ctl(&self, args: &[&str]) {
        let out = Command::new("rabbitmqctl")
            .arg("-q")
            .args(args)
            .output()
            .expect("running rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self, password: &str) -> String {
        format!("amqp://{}:{password}@127.0.0.1:5672/%2f", self.name)
    }

    /// What the broker refusing this user says.
    fn refusal(&self) -> String {
        format!(
            "the broker refused user `{}`: wrong password or no permission on vhost `/`",
            self.name
        )
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

/// The producer with a wrong password exits 3 saying which user the broker refused on
/// which vhost: no password, no lapin ERROR line, no "is it running?".
#[tokio::test]
async fn producer_with_a_wrong_password_exits_3_naming_the_user_and_vhost() {
    let env = TestEnv::new().await;
    let user = TestUser::create("right-password");
    let out = tokio::process::Command::new(bin("producer"))
        .args(["status", "00000000-0000-4000-8000-000000000000"])
        .envs(env.env_vars())
        .env("VIDPIPE__AMQP__URL", user.url("wrong-password"))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&user.refusal()), "{stderr}");
    assert!(!stderr.contains("wrong-password"), "{stderr}");
    assert!(!stderr.contains("lapin"), "{stderr}");
    assert!(!stderr.contains("is it running"), "{stderr}");
}

/// A worker with a wrong password stays up, says the refusal once per attempt in our
/// words (never the password, never lapin's lines), and connects once the broker's
/// password is changed to the one it has.
#[tokio::test]
async fn worker_with_a_wrong_password_retries_in_our_words_and_recovers_when_the_password_changes()
{
    let mut env = TestEnv::new().await;
    let user = TestUser::create("old-password");
    let url = user.url("new-password");
    let w = env.spawn_worker(
        "vidpipe-testworker",
        "refused",
        &[
            ("VIDPIPE__AMQP__URL", url.as_str()),
            ("VIDPIPE__AMQP__MAX_BACKOFF_SECS", "0.3"),
        ],
    );
    let refusal = user.refusal();
    eventually(PATIENCE, "three refusals logged", async || {
        env.worker(w).log_text().matches(&refusal).count() >= 3
    })
    .await;
    assert!(env.worker(w).is_running(), "{}", env.logs());
    let log = env.worker(w).log_text();
    let attempts = log.lines().filter(|l| l.contains("retry_in=")).count();
    assert_eq!(
        log.matches(&refusal).count(),
        attempts,
        "one line per attempt:\n{log}"
    );
    assert!(!log.contains("new-password"), "{log}");
    assert!(!log.contains("lapin"), "{log}");

    user.ctl(&["change_password", &user.name, "new-password"]);
    eventually(
        PATIENCE,
        "connected with the rotated password",
        async || env.worker(w).log_text().contains("connected to the broker"),
    )
    .await;
    assert!(env.worker(w).is_running(), "{}", env.logs());
}

/// A worker logging to a file (stderr not a terminal) writes no ANSI colour codes.
#[tokio::test]
async fn a_workers_log_file_has_no_colour_codes() {
    if std::env::var_os("TEST_LOG").is_some() {
        return; // logs go to the terminal then, not to a file
    }
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker("transcoder", "plain", &[]);
    eventually(PATIENCE, "the worker connected", async || {
        env.worker(w).log_text().contains("connected to the broker")
    })
    .await;
    let log = env.worker(w).log_text();
    assert!(!log.contains("\x1b["), "{log:?}");
}
