//! TLS to the broker: a private node with a TLS listener that demands a client
//! certificate (`verify_peer`, `fail_if_no_peer_cert`), certificates made with the
//! `openssl` CLI at test time; worker processes, the producer CLI and in-process
//! connections go through it. One node serves every check (starting one takes about ten
//! seconds); each assertion names the behaviour it proves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use shared::broker;
use shared::settings::{AmqpSettings, Secret};

use crate::support::node::PrivateNode;
use crate::support::{TestEnv, bin, job_keys, test_job};

/// The private node's plain AMQP port (its distribution port is this + 20000).
const NODE_PORT: u16 = 5691;
/// Its TLS listener.
const TLS_PORT: u16 = 5692;
const WORKER: &str = "vidpipe-testworker";
const PATIENCE: Duration = Duration::from_secs(30);

/// A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate,
/// plus an unrelated CA that signed neither.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::Builder::new()
                .prefix("vidpipe-pki-")
                .tempdir()
                .expect("pki dir"),
        };
        pki.ca("ca", "vidpipe test CA");
        pki.ca("other-ca", "some other CA");
        pki.leaf(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        pki.leaf(
            "client",
            "vidpipe-test-client",
            "extendedKeyUsage=clientAuth\n",
        );
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn p(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("the openssl CLI is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    const KEY: [&'static str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

    /// `<name>.pem` (self-signed CA) and `<name>.key`.
    fn ca(&self, name: &str, cn: &str) {
        let (key, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
        args.extend(Self::KEY);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &pem,
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        self.openssl(&args);
    }

    /// `<name>.pem` and `<name>.key` (PKCS#8), signed by `ca`, with extensions `ext`.
    fn leaf(&self, name: &str, cn: &str, ext: &str) {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.path(&extfile),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .unwrap();
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-nodes"];
        args.extend(Self::KEY);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        self.openssl(&args);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ]);
    }
}

fn tls_url() -> String {
    format!("amqps://guest:guest@localhost:{TLS_PORT}/%2f")
}

/// `amqp` settings for the TLS listener.
fn settings(ca: &Path, client: Option<(&Path, &Path)>) -> AmqpSettings {
    AmqpSettings {
        url: Secret::new(tls_url()),
        tls_ca_file: Some(ca.to_path_buf()),
        tls_client_cert_file: client.map(|c| c.0.to_path_buf()),
        tls_client_key_file: client.map(|c| c.1.to_path_buf()),
        ..Default::default()
    }
}

/// One in-process connection attempt, bounded in time.
async fn attempt(settings: &AmqpSettings) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(20),
        broker::try_connect(settings, "vidpipe-tests-tls"),
    )
    .await
    {
        Err(_) => Err("no answer within 20 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "done".into()).await;
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_works_only_with_a_trusted_server_and_a_client_certificate() {
    let pki = Pki::new();
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{TLS_PORT}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n",
        pki.p("ca.pem"),
        pki.p("server.pem"),
        pki.p("server.key"),
    );
    // Declared after `pki`: the node stops before its certificates are deleted.
    let node = tokio::task::spawn_blocking(move || PrivateNode::start(NODE_PORT, &conf))
        .await
        .unwrap();
    let (ca, other_ca) = (pki.path("ca.pem"), pki.path("other-ca.pem"));
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));

    // The test's own world connects over plain AMQP; the workers over TLS.
    let mut env = TestEnv::on_broker(&node.amqp_url()).await;
    let url = tls_url();
    let (ca_s, cert_s, key_s) = (pki.p("ca.pem"), pki.p("client.pem"), pki.p("client.key"));
    let no_cert_worker = env.spawn_worker(
        WORKER,
        "tls-no-cert",
        &[
            ("VIDPIPE__AMQP__URL", &url),
            ("VIDPIPE__AMQP__TLS_CA_FILE", &ca_s),
        ],
    );
    env.spawn_worker(
        WORKER,
        "tls-worker",
        &[
            ("VIDPIPE__AMQP__URL", &url),
            ("VIDPIPE__AMQP__TLS_CA_FILE", &ca_s),
            ("VIDPIPE__AMQP__TLS_CLIENT_CERT_FILE", &cert_s),
            ("VIDPIPE__AMQP__TLS_CLIENT_KEY_FILE", &key_s),
        ],
    );

    // (a) A worker with the CA and a client certificate connects over amqps:// and
    // completes a job.
    let good = settings(&ca, Some((&cert, &key)));
    if let Err(e) = attempt(&good).await {
        panic!(
            "(a) with the right CA and a client certificate, amqps:// should connect: {e}\n{}",
            env.logs()
        );
    }
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, id.as_bytes()).await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let deadline = Instant::now() + PATIENCE;
    let manifest = loop {
        if let Some(m) = env.storage.manifest(&prefix).await.expect("manifest") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "(a) a worker on amqps:// with CA and client certificate should complete a job \
             within {PATIENCE:?}; worker logs:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        manifest.completion.worker, "tls-worker",
        "(a) the job should be done by the worker with the client certificate"
    );
    let listed = node.ctl(&["list_connections", "-q", "ssl", "client_properties"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("tls-worker") && l.trim_start().starts_with("true")),
        "(a) the worker's connection should be a TLS one; connections:\n{listed}"
    );

    // (b) Without a client certificate the broker refuses the connection (with a
    // `certificate_required` alert, or by resetting it before the client reads the alert),
    // and a worker without one says why and keeps trying. (a) succeeded on the same
    // listener with the same CA, so the missing certificate is the reason.
    let no_cert_err = attempt(&settings(&ca, None)).await.err();
    assert!(
        no_cert_err.is_some(),
        "(b) amqps:// without a client certificate should be refused"
    );
    assert!(
        !listed.contains("tls-no-cert"),
        "(b) the worker without a client certificate should not be connected:\n{listed}"
    );
    let no_cert = env.worker(no_cert_worker);
    assert!(
        no_cert.is_running(),
        "(b) the worker without a client certificate should keep retrying, not exit:\n{}",
        no_cert.log_text()
    );
    if std::env::var_os("TEST_LOG").is_none() {
        let log = no_cert.log_text();
        assert!(
            log.contains("broker unreachable") && log.contains("localhost:5692"),
            "(b) the worker without a client certificate should log why it cannot connect:\n{log}"
        );
    }

    // (c) A server certificate from a CA we don't trust is refused, even with a valid
    // client certificate.
    let err = attempt(&settings(&other_ca, Some((&cert, &key))))
        .await
        .err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.to_lowercase().contains("certificate")),
        "(c) amqps:// should refuse a server certificate signed by an untrusted CA: {err:?}"
    );

    // (d) The producer connects over amqps:// with the same settings (and without the
    // client certificate is refused: exit code 3).
    let producer = |with_cert: bool| {
        let mut cmd = tokio::process::Command::new(bin("producer"));
        cmd.args(["status", &id.to_string()])
            .envs(env.env_vars())
            .env("VIDPIPE__AMQP__URL", &url)
            .env("VIDPIPE__AMQP__TLS_CA_FILE", &ca_s);
        if with_cert {
            cmd.env("VIDPIPE__AMQP__TLS_CLIENT_CERT_FILE", &cert_s)
                .env("VIDPIPE__AMQP__TLS_CLIENT_KEY_FILE", &key_s);
        }
        cmd.output()
    };
    let out = producer(true).await.expect("running the producer");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("completed"),
        "(d) `producer status` over amqps:// with a client certificate should show the job: \
         {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = producer(false).await.expect("running the producer");
    assert_eq!(
        out.status.code(),
        Some(3),
        "(d) `producer status` over amqps:// without a client certificate should fail to \
         connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(env);
    drop(node);
}
