//! A real S3 server for tests: moto in server mode on a private port, behind a TCP proxy
//! the test can cut and restore (the store "goes away" without losing its contents).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::settings::{S3Settings, Secret, StorageBackend, StorageSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// moto plus an on/off proxy in front of it.
pub struct S3Server {
    moto: Child,
    moto_port: u16,
    /// What clients use.
    pub port: u16,
    proxy: Arc<Mutex<Option<CancellationToken>>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request to moto (with `curl`); returns the status code.
fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "5",
            "-w",
            "%{http_code}",
            "-X",
            method,
        ])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|c| *c != 0)
}

impl S3Server {
    /// Starts moto (needs `python3 -m pip install "moto[s3]" flask flask-cors`; the test
    /// command's setup does it) and the proxy, and makes `bucket`.
    pub async fn start(bucket: &str) -> Self {
        let moto_port = free_port();
        let moto = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &moto_port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto (scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(moto_port, "GET", "/").is_none() {
            assert!(
                Instant::now() < deadline,
                "moto did not start on port {moto_port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            http(moto_port, "PUT", &format!("/{bucket}")),
            Some(200),
            "creating bucket {bucket}"
        );
        let server = Self {
            moto,
            moto_port,
            port: free_port(),
            proxy: Arc::new(Mutex::new(None)),
        };
        server.up().await;
        server
    }

    /// Makes the store reachable (again). The proxy runs on its own thread and runtime,
    /// so a test blocking its own thread (waiting on a process) never starves it.
    pub async fn up(&self) {
        let token = CancellationToken::new();
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).expect("proxy port");
        listener.set_nonblocking(true).unwrap();
        let (moto_port, stop) = (self.moto_port, token.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let (mut inbound, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", moto_port)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    });
                }
            });
        });
        *self.proxy.lock().unwrap() = Some(token);
    }

    /// Makes a bucket (directly on moto).
    pub fn create_bucket(&self, bucket: &str) {
        assert_eq!(
            http(self.moto_port, "PUT", &format!("/{bucket}")),
            Some(200),
            "creating bucket {bucket}"
        );
    }

    /// Puts an object directly on moto, past the store's client: for objects that client
    /// never writes (a body its metadata contradicts). `headers` are `Name: value`.
    pub fn put_raw(&self, bucket: &str, key: &str, body: &str, headers: &[&str]) {
        let mut curl = Command::new("curl");
        curl.args(["-sf", "-o", "/dev/null", "-m", "5", "-X", "PUT"]);
        for header in headers {
            curl.args(["-H", header]);
        }
        let status = curl
            .args(["--data-binary", body])
            .arg(format!(
                "http://127.0.0.1:{}/{bucket}/{key}",
                self.moto_port
            ))
            .status()
            .expect("curl");
        assert!(status.success(), "putting {key} in {bucket}");
    }

    /// The response headers of a `HEAD` of `key` on moto, lower-cased. Signed with the
    /// test credentials: moto refuses anonymous reads of what a signed client wrote.
    pub fn head_raw(&self, bucket: &str, key: &str) -> String {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-m",
                "5",
                "-I",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
            ])
            .args(["--user", "vidpipe-test:vidpipe-test-secret"])
            .arg(format!(
                "http://127.0.0.1:{}/{bucket}/{key}",
                self.moto_port
            ))
            .output()
            .expect("curl");
        assert!(out.status.success(), "HEAD of {key} in {bucket}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    }

    /// Cuts the store off: new connections are refused, open ones dropped.
    pub fn down(&self) {
        if let Some(token) = self.proxy.lock().unwrap().take() {
            token.cancel();
        }
    }

    /// Storage settings pointing at `bucket` on this server.
    pub fn settings(&self, bucket: &str) -> StorageSettings {
        StorageSettings {
            backend: StorageBackend::S3,
            upload_buffer_bytes: 5 << 20,
            s3: S3Settings {
                bucket: bucket.into(),
                endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
                region: Some("us-east-1".into()),
                path_style: true,
                allow_http: true,
                access_key_id: Some("vidpipe-test".into()),
                secret_access_key: Some(Secret::new("vidpipe-test-secret")),
                max_retries: 1,
                retry_timeout_secs: 2.0,
            },
            ..Default::default()
        }
    }

    /// The same settings as worker environment variables.
    pub fn env(&self, bucket: &str) -> Vec<(String, String)> {
        [
            ("VIDPIPE__STORAGE__BACKEND", "s3".to_owned()),
            (
                "VIDPIPE__STORAGE__UPLOAD_BUFFER_BYTES",
                (5u32 << 20).to_string(),
            ),
            ("VIDPIPE__STORAGE__S3__BUCKET", bucket.to_owned()),
            (
                "VIDPIPE__STORAGE__S3__ENDPOINT",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("VIDPIPE__STORAGE__S3__REGION", "us-east-1".into()),
            ("VIDPIPE__STORAGE__S3__PATH_STYLE", "true".into()),
            ("VIDPIPE__STORAGE__S3__ALLOW_HTTP", "true".into()),
            ("VIDPIPE__STORAGE__S3__ACCESS_KEY_ID", "vidpipe-test".into()),
            (
                "VIDPIPE__STORAGE__S3__SECRET_ACCESS_KEY",
                "vidpipe-test-secret".into(),
            ),
            ("VIDPIPE__STORAGE__S3__MAX_RETRIES", "1".into()),
            ("VIDPIPE__STORAGE__S3__RETRY_TIMEOUT_SECS", "2".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.down();
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}
