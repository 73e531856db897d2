//! `hub demo`: a hub on the default settings and a simulated fleet in one
//! process, with a status line every second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use device_sim::{FleetConfig, FleetStats};
use tokio_util::sync::CancellationToken;

use crate::app::Hub;
use crate::config::Settings;
use crate::metrics::HubMetrics;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Readings per second per device.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Settings file over the built-in defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.as_deref())?;
    let db = settings.storage.path.clone();
    let hub = Hub::start(settings).await?;
    let url = format!("http://{}", hub.local_addr());
    println!(
        "hub listening on {url}, storing in {}; {} simulated devices at {} readings/s each. Ctrl-C stops.",
        db.display(),
        args.devices,
        args.rate
    );
    match hub.http_addr() {
        Some(addr) => println!("web console: http://{addr}/"),
        None => println!("web console: off (http.enabled = false)"),
    }
    println!(
        "meanwhile, in another terminal: target/release/hub devices   or   target/release/hub query --device sim-00001 --since 1m"
    );

    let stop = CancellationToken::new();
    let stats = Arc::new(FleetStats::default());
    let fleet_cfg = FleetConfig {
        hub: url.clone(),
        devices: args.devices,
        rate_hz: args.rate,
        ..FleetConfig::default()
    };
    let drain = fleet_cfg.drain_timeout;
    let fleet = tokio::spawn(device_sim::run(fleet_cfg, stop.clone(), Arc::clone(&stats)));

    let until = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(until);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_committed = 0;
    loop {
        tokio::select! {
            _ = &mut until => break,
            reason = hub.failed() => {
                stop.cancel();
                anyhow::bail!(reason);
            }
            _ = tick.tick() => {
                let committed = HubMetrics::get(&hub.metrics().readings_committed);
                let stored = hub.store().total_readings().await.unwrap_or(0);
                let sent = FleetStats::get(&stats.sent);
                let acked = FleetStats::get(&stats.acked);
                println!(
                    "devices online {:>5} | readings/s {:>8} | stored {:>11} | ack lag {:>6} readings, p99 {:>6.1} ms",
                    hub.metrics().live_sessions(),
                    committed - last_committed,
                    stored,
                    sent.saturating_sub(acked),
                    stats.ack_latency_ms(0.99),
                );
                last_committed = committed;
            }
        }
    }

    println!("stopping: devices drain their last readings, then the hub shuts down");
    stop.cancel();
    let summary = tokio::time::timeout(drain + Duration::from_secs(10), fleet)
        .await
        .context("the fleet did not stop in time")?
        .context("fleet task")??;
    hub.shutdown().await?;
    println!(
        "done: {} readings sent, {} acked, {} of {} devices closed cleanly.",
        summary.sent, summary.acked, summary.clean_devices, summary.devices
    );
    println!(
        "The data is in {}. To look at it, start the hub (target/release/hub serve) and open http://127.0.0.1:8080/ or, in another terminal, run\n  target/release/hub devices\n  target/release/hub query --device sim-00001 --since 10m --limit 20\n  target/release/hub query --device sim-00001 --sensor temperature --bucket 1m --agg avg,min,max\n  target/release/hub twin get sim-00001\n  target/release/hub devices --where 'in_sync = false'",
        db.display()
    );
    Ok(())
}
