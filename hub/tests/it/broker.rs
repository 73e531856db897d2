//! An MQTT broker of the test's own, on a free port, that can be killed and
//! started again: Mosquitto when it is installed, else a small broker of
//! our own in-process (`embedded`). `HUB_TEST_MQTT_BROKER=mosquitto|embedded`
//! picks one; under `HUB_TEST_REQUIRE_ALL=1` (CI) the fallback is not
//! allowed unless asked for by name, so CI tests against Mosquitto (and runs
//! the MQTT tests once more on the embedded broker, asked for by name).

mod embedded;

use std::path::Path;
use std::time::Duration;

use crate::harness::{WAIT, require_all};

pub struct TestBroker {
    pub port: u16,
    kind: Kind,
}

enum Kind {
    Mosquitto {
        conf: tempfile::NamedTempFile,
        child: Option<std::process::Child>,
    },
    Embedded {
        stop: Option<std::sync::mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

/// A port held for the broker's life: a restart finds it free.
fn free_port() -> u16 {
    let reserved = crate::harness::reserve_port();
    let port = reserved.port;
    // Held until the test process exits: a broker lives as long as its test.
    std::mem::forget(reserved);
    port
}

fn mosquitto_installed() -> bool {
    std::process::Command::new("mosquitto")
        .arg("-h")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

impl TestBroker {
    /// A Mosquitto with a plain listener (`port`) and a TLS one (returned),
    /// serving `cert`/`key`; None (the test says SKIPPED) without Mosquitto:
    /// the in-process fallback has no TLS.
    pub fn start_with_tls(cert: &Path, key: &Path) -> Option<(TestBroker, u16)> {
        if !mosquitto_installed() {
            crate::harness::skip("mosquitto (for a TLS broker)", "PATH");
            return None;
        }
        let (port, tls_port) = (free_port(), free_port());
        let conf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            conf.path(),
            format!(
                "per_listener_settings false\nallow_anonymous true\npersistence false\n\
                 listener {port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let mut broker = TestBroker {
            port,
            kind: Kind::Mosquitto { conf, child: None },
        };
        broker.restart();
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "no TLS listener");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some((broker, tls_port))
    }

    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> TestBroker {
        let choice = std::env::var("HUB_TEST_MQTT_BROKER").ok();
        let use_mosquitto = match choice.as_deref() {
            Some("mosquitto") => true,
            Some("embedded") => false,
            Some(other) => panic!("HUB_TEST_MQTT_BROKER={other}: use mosquitto or embedded"),
            None => {
                let installed = mosquitto_installed();
                assert!(
                    installed || !require_all(),
                    "mosquitto is not installed and HUB_TEST_REQUIRE_ALL=1 forbids the in-process fallback"
                );
                installed
            }
        };
        let port = free_port();
        let kind = if use_mosquitto {
            let conf = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(
                conf.path(),
                format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
            )
            .unwrap();
            Kind::Mosquitto { conf, child: None }
        } else {
            Kind::Embedded {
                stop: None,
                thread: None,
            }
        };
        let mut broker = TestBroker { port, kind };
        broker.restart();
        broker
    }

    /// Starts the broker (again), empty: no sessions, no retained messages.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        match &mut self.kind {
            Kind::Mosquitto { conf, child } => {
                *child = Some(
                    std::process::Command::new("mosquitto")
                        .arg("-c")
                        .arg(conf.path())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .expect("mosquitto starts"),
                );
            }
            Kind::Embedded { stop, thread } => {
                let (tx, rx) = std::sync::mpsc::channel();
                *stop = Some(tx);
                *thread = Some(std::thread::spawn(move || embedded::run(port, rx)));
            }
        }
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the MQTT broker did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker: every connection to it is cut.
    pub fn kill(&mut self) {
        match &mut self.kind {
            Kind::Mosquitto { child, .. } => {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            Kind::Embedded { stop, thread } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
