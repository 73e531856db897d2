//! The web console in a real browser: Debian's chromium driven through
//! chromedriver's WebDriver protocol, against a real hub and simulated
//! devices. Screenshots go to `target/console-screenshots/`; with
//! `HUB_UPDATE_SCREENSHOT=1` the device page's also replaces the README's
//! `docs/console-device.png`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use telemetry_proto::v1 as pb;

use crate::harness::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver and one headless chromium session, ended on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// None (after saying SKIPPED, or failing under HUB_TEST_REQUIRE_ALL)
    /// when chromium or chromedriver is not installed.
    async fn start() -> Option<Browser> {
        if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
            skip("chromium + chromium-driver", CHROMEDRIVER);
            return None;
        }
        // Held for the test process: chromedriver listens on it.
        let reserved = reserve_port();
        let port = reserved.port;
        std::mem::forget(reserved);
        let driver = std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        wait_until("chromedriver is ready", || async {
            match client.get(format!("{base}/status")).send().await {
                Ok(res) => res
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
        }}});
        let res: Value = client
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {res}"))
            .to_owned();
        Some(Browser {
            driver,
            base,
            session,
            client,
            _profile: profile,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.client.request(method, url);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res: Value = req.send().await.unwrap().json().await.unwrap();
        if let Some(error) = res["value"]["error"].as_str() {
            panic!("WebDriver {path}: {error}: {}", res["value"]["message"]);
        }
        res["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body) in the page; its return value.
    async fn js(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until `script` returns true in the page.
    async fn wait_for(&self, what: &str, script: &str) {
        wait_until(what, || async { self.js(script).await == true }).await;
    }

    async fn click(&self, css: &str) {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("an element id")
            .to_owned();
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Saves a PNG of the window as `target/console-screenshots/<name>.png`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends chromium with the session; then the driver.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    reqwest::Client::new().delete(url).send(),
                )
                .await;
            });
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_fleet_live_charts_and_a_ping_to_success() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let hub = spawn_hub().await;
    // An hour of history first (for charts worth looking at), then live.
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: hub.url(),
        devices: 3,
        rate_hz: 5.0,
        id_prefix: "web-".into(),
        backfill: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await;
    wait_until("the hour of history is stored", || async {
        fleet.acked() >= 3 * 5 * 3600
    })
    .await;
    let console = hub.http_url();

    // Fleet: the simulated devices, online, and the counts.
    browser.goto(&format!("{console}/#/")).await;
    browser
        .wait_for(
            "the fleet table lists the devices",
            "const ids = [...document.querySelectorAll('#device-rows tr')].map(r => r.dataset.device);
             return ids.join(',') === 'web-00001,web-00002,web-00003'
                 && document.querySelectorAll('#device-rows .badge.online').length === 3
                 && document.getElementById('online-count').textContent === '3';",
        )
        .await;
    browser
        .wait_for(
            "readings/s is shown",
            "return Number(document.getElementById('readings-rate').textContent.replace(/\\D/g, '')) > 0;",
        )
        .await;
    // Sorting by a column and searching.
    browser.click("th[data-key='device_id']").await;
    browser
        .wait_for(
            "descending order",
            "return document.querySelector('#device-rows tr').dataset.device === 'web-00003';",
        )
        .await;
    browser.screenshot("fleet").await;

    // Device: a chart per sensor whose data grows while the fleet streams.
    browser
        .goto(&format!("{console}/#/devices/web-00001"))
        .await;
    browser
        .wait_for(
            "a chart per sensor, with data",
            "const charts = document.querySelectorAll('#charts [data-sensor]');
             return charts.length === 4
                 && [...charts].every(c => Number(c.dataset.readings || 0) > 0
                                        && c.querySelector('canvas'));",
        )
        .await;
    // Live readings fold into the newest bucket, or start a later one.
    let last_ts =
        "return Number(document.querySelector(\"[data-sensor='temperature']\").dataset.lastTs);";
    let before = browser.js(last_ts).await.as_f64().unwrap();
    browser
        .wait_for(
            "the temperature chart grows with live readings",
            &format!(
                "const c = document.querySelector(\"[data-sensor='temperature']\");
                 return Number(c.dataset.live) >= 3 && Number(c.dataset.lastTs) >= {before};"
            ),
        )
        .await;

    // A ping from the page runs to SUCCEEDED, every state shown.
    browser.click("#cmd-send").await;
    browser
        .wait_for(
            "the ping succeeded on the page",
            "const row = document.querySelector('#command-rows tr');
             return !!row && row.querySelector('[data-state]').dataset.state === 'SUCCEEDED'
                 && row.querySelector('.trail').textContent.startsWith('QUEUED → SENT → RECEIVED → SUCCEEDED');",
        )
        .await;
    browser.js("window.scrollTo(0, 0); return true;").await;
    let shot = browser.screenshot("device").await;
    if std::env::var("HUB_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let readme_image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console-device.png");
        std::fs::create_dir_all(readme_image.parent().unwrap()).unwrap();
        std::fs::copy(&shot, readme_image).unwrap();
    }
    // Another range is a bucketed query.
    browser.click("[data-range='6h']").await;
    browser
        .wait_for(
            "the 6 h range is drawn",
            "const c = document.querySelector(\"[data-sensor='temperature']\");
             return !!c && Number(c.dataset.points) >= 1
                 && document.querySelector(\"[data-range='6h']\").classList.contains('active');",
        )
        .await;

    // Commands page, and the hub's counters.
    browser.goto(&format!("{console}/#/commands")).await;
    browser
        .wait_for(
            "the commands page lists the ping",
            "return [...document.querySelectorAll('#commands-rows tr')].some(r => r.textContent.includes('ping') && r.textContent.includes('SUCCEEDED'));",
        )
        .await;
    browser.goto(&format!("{console}/#/hub")).await;
    browser
        .wait_for(
            "the hub page shows live counters",
            "const v = document.querySelector(\"[data-stat='live_sessions']\");
             return !!v && v.textContent === '3';",
        )
        .await;

    // A phone-sized screen: nothing wider than the window.
    browser.resize(390, 844).await;
    browser
        .goto(&format!("{console}/#/devices/web-00002"))
        .await;
    browser
        .wait_for(
            "the device page fits a phone",
            "return document.querySelectorAll('#charts canvas').length === 4
                 && document.documentElement.scrollWidth <= window.innerWidth + 1;",
        )
        .await;
    browser.screenshot("device-phone").await;
    browser.resize(1280, 1000).await;

    assert!(
        browser
            .js("return document.getElementById('error').hidden;")
            .await
            == true,
        "no error was shown: {}",
        browser
            .js("return document.getElementById('error').textContent;")
            .await
    );
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_says_so_when_the_hub_goes_away() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let mut hub = spawn_hub().await;
    hub.register_offline("still-1").await;
    let console = hub.http_url();
    browser.goto(&format!("{console}/#/")).await;
    browser
        .wait_for(
            "the fleet page is up",
            "return document.querySelectorAll('#device-rows tr').length === 1
                 && document.getElementById('conn').classList.contains('live');",
        )
        .await;
    hub.stop().await;
    browser
        .wait_for(
            "an error message instead of a blank page",
            "const e = document.getElementById('error');
             return !e.hidden && e.textContent.includes('hub')
                 && document.getElementById('conn').classList.contains('down')
                 && document.querySelectorAll('#device-rows tr').length === 1;",
        )
        .await;
    browser.screenshot("hub-gone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_twins_side_by_side_and_edits_desired_state_and_tags() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let hub = spawn_hub().await;
    let fleet = SimFleet::start(&hub, "twc-", 2).await;
    wait_until("the sims reported", || async {
        let info = hub.device("twc-00002").await.unwrap();
        info.reported_version >= 2
    })
    .await;
    // Something the simulator does not understand stays out of sync.
    hub.operator()
        .await
        .update_desired(pb::UpdateDesiredRequest {
            device_id: "twc-00002".into(),
            patch_json: r#"{"color": "blue"}"#.into(),
            if_version: None,
        })
        .await
        .unwrap();
    let console = hub.http_url();
    browser.goto(&format!("{console}/#/")).await;
    browser
        .wait_for(
            "the out-of-sync count",
            "return document.getElementById('out-of-sync-count').textContent === '1'
                 && document.querySelectorAll('#device-rows .badge.out-of-sync').length === 1;",
        )
        .await;
    browser.click("#only-out-of-sync").await;
    browser
        .wait_for(
            "the out-of-sync filter",
            "const ids = [...document.querySelectorAll('#device-rows tr')].map(r => r.dataset.device);
             return ids.join(',') === 'twc-00002';",
        )
        .await;

    // The device page: desired, reported and delta side by side.
    browser
        .goto(&format!("{console}/#/devices/twc-00001"))
        .await;
    browser
        .wait_for(
            "the twin panel",
            "const r = document.getElementById('twin-reported');
             return !!r && r.textContent.includes('uptime_s')
                 && document.getElementById('twin-sync').textContent === 'in sync';",
        )
        .await;
    browser
        .js("document.getElementById('desired-patch').value = '{\"sample_rate_hz\": 7, \"color\": \"red\"}'; return true;")
        .await;
    browser.click("#desired-apply").await;
    // The simulator applies the rate (seen live) and not the colour.
    browser
        .wait_for(
            "the device converged on what it understands",
            "const reported = JSON.parse(document.getElementById('twin-reported').textContent);
             const delta = JSON.parse(document.getElementById('twin-delta').textContent);
             return reported.sample_rate_hz === 7 && JSON.stringify(delta) === '{\"color\":\"red\"}'
                 && document.getElementById('twin-sync').textContent === 'out of sync';",
        )
        .await;
    browser
        .js("document.getElementById('tags-edit').value = 'site=plant-7\\nrack=r1'; return true;")
        .await;
    browser.click("#tags-apply").await;
    wait_until("the tags are saved", || async {
        hub.device("twc-00001").await.unwrap().labels.len() == 2
    })
    .await;
    browser.screenshot("device-twin").await;
    assert!(
        browser
            .js("return document.getElementById('error').hidden;")
            .await
            == true,
        "no error was shown: {}",
        browser
            .js("return document.getElementById('error').textContent;")
            .await
    );
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_alarms_live_acknowledges_them_and_shows_job_progress() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let hub = spawn_hub().await;
    let console = hub.http_url();
    crate::alarms::put_rule(
        &console,
        "console-hot",
        json!({"severity": "critical", "threshold": {"sensor": "t", "raise": "> 50"}}),
    )
    .await;
    let (mut dev, _) = RawDevice::connect(&hub, "con-al").await;
    browser.goto(&format!("{console}/#/alarms")).await;
    browser
        .wait_for(
            "the rules table",
            "return !!document.querySelector('#rule-rows tr[data-rule=\"console-hot\"]');",
        )
        .await;
    // A rule written in the console.
    browser
        .js(r#"document.getElementById('rule-spec').value = '{"name": "console-cold", "severity": "minor", "threshold": {"sensor": "t", "raise": "< -40"}}'; return true;"#)
        .await;
    browser.click("#rule-save").await;
    browser
        .wait_for(
            "the new rule",
            "return !!document.querySelector('#rule-rows tr[data-rule=\"console-cold\"]');",
        )
        .await;
    // Raised while the page is open: it appears live.
    dev.send(batch(vec![reading(1, "t", now_ms() - 1_000, 60.0)]))
        .await;
    dev.ack_through(1).await;
    browser
        .wait_for(
            "the alarm row",
            "const r = document.querySelector('#alarm-rows tr');
             return !!r && r.textContent.includes('con-al') && r.textContent.includes('active');",
        )
        .await;
    browser
        .js("window.prompt = () => 'looking'; return true;")
        .await;
    browser.click("#alarm-rows button[data-act=ack]").await;
    browser
        .wait_for(
            "acknowledged",
            "const r = document.querySelector('#alarm-rows tr');
             return !!r && r.textContent.includes('acknowledged') && r.textContent.includes('looking');",
        )
        .await;
    // The fleet page shows the device's badge; the device page its alarm.
    browser.goto(&format!("{console}/#/")).await;
    browser
        .wait_for(
            "the fleet's alarm badge",
            "const b = document.querySelector('#device-rows tr[data-device=\"con-al\"] [data-alarms]');
             return !!b && b.textContent.includes('critical')
                 && document.getElementById('alarmed-count').textContent === '1';",
        )
        .await;
    browser.goto(&format!("{console}/#/devices/con-al")).await;
    browser
        .wait_for(
            "the device's alarm badge",
            "const b = document.getElementById('device-alarms');
             return !!b && b.textContent.includes('console-hot');",
        )
        .await;

    // Jobs: a job over an offline device stays in progress with its bar.
    hub.register_offline("con-job").await;
    hub.operator()
        .await
        .update_tags(pb::UpdateTagsRequest {
            device_id: "con-job".into(),
            set: [("ring".to_owned(), "c".to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
    browser.goto(&format!("{console}/#/jobs")).await;
    browser
        .js(r#"document.getElementById('job-spec').value = '{"name": "console-job", "target": {"tags": {"ring": "c"}}, "command": {"name": "ping"}}'; return true;"#)
        .await;
    browser.click("#job-create").await;
    browser
        .wait_for(
            "the job's progress bar",
            "const j = document.querySelector('.job');
             return !!j && j.textContent.includes('console-job') && !!j.querySelector('.progress')
                 && j.querySelector('.progress').getAttribute('aria-valuemax') === '1';",
        )
        .await;
    browser.screenshot("jobs").await;
    assert!(
        browser
            .js("return document.getElementById('error').hidden;")
            .await
            == true,
        "no error was shown: {}",
        browser
            .js("return document.getElementById('error').textContent;")
            .await
    );
}
