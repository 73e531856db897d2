//! `hub command send|list|show|cancel`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures_util::future::join_all;
use telemetry_proto::v1 as pb;

use super::output::{self, Format};
use super::{HubAddr, connect, list_devices, parse_time, status_error};

#[derive(Subcommand, Debug)]
pub enum CommandAction {
    /// Send a command to devices (each gets its own command id).
    Send(SendArgs),
    /// List commands, newest first.
    List(ListArgs),
    /// One command with its history.
    Show(IdArgs),
    /// Cancel a command that is not final yet.
    Cancel(IdArgs),
}

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    /// Target device (repeatable).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Target every device with this tag (key=value; repeatable, all must
    /// match; `--label` is the older name).
    #[arg(long = "tag", alias = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// With --tag: only the devices this fleet filter also matches
    /// (`reported.battery < 20 and online = true`).
    #[arg(long = "where", requires = "labels")]
    pub filter: Option<String>,
    /// Command name, e.g. ping, set_rate.
    #[arg(long)]
    pub name: String,
    /// Parameters: a JSON object.
    #[arg(long)]
    pub params: Option<String>,
    /// Time to live (default: the hub's commands.default_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Wait this long for a final state; exit 0 SUCCEEDED, 2 FAILED/REJECTED/CANCELLED, 3 EXPIRED or still waiting.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    #[arg(long)]
    pub device: Option<String>,
    /// QUEUED, SENT, RECEIVED, SUCCEEDED, FAILED, REJECTED, EXPIRED or CANCELLED.
    #[arg(long, value_parser = parse_state)]
    pub state: Option<pb::CommandState>,
    /// Created at or after: a duration ago or an RFC3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    /// The command id.
    pub id: String,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{raw:?} is not key=value"))
}

/// `--params` must be a JSON object; checked before anything is sent.
pub fn parse_params(raw: &str) -> Result<String, String> {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v) if v.is_object() => Ok(v.to_string()),
        Ok(_) => Err("must be a JSON object, e.g. '{\"hz\": 5}'".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

fn parse_state(raw: &str) -> Result<pb::CommandState, String> {
    pb::CommandState::from_str_name(&format!("COMMAND_STATE_{}", raw.to_ascii_uppercase()))
        .filter(|s| *s != pb::CommandState::Unspecified)
        .ok_or_else(|| format!("unknown state {raw:?}"))
}

/// Process exit code for a set of commands after `--wait`.
pub fn wait_exit_code(states: &[pb::CommandState]) -> u8 {
    use pb::CommandState as S;
    if states.iter().all(|s| *s == S::Succeeded) {
        0
    } else if states.iter().any(|s| {
        matches!(
            s,
            S::Expired | S::Queued | S::Sent | S::Received | S::Unspecified
        )
    }) {
        3
    } else {
        2
    }
}

/// Runs a `hub command` subcommand; returns the process exit code.
pub async fn run(action: &CommandAction, out: &mut impl Write) -> anyhow::Result<u8> {
    match action {
        CommandAction::Send(args) => send(args, out).await,
        CommandAction::List(args) => {
            let mut client = connect(&args.addr).await?;
            let commands = client
                .list_commands(pb::ListCommandsRequest {
                    device_id: args.device.clone().unwrap_or_default(),
                    state: args.state.map_or(0, |s| s as i32),
                    since_ms: args.since,
                    until_ms: None,
                    limit: args.limit,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .commands;
            output::print_commands(args.format, &commands, out)?;
            Ok(0)
        }
        CommandAction::Show(args) => {
            let mut client = connect(&args.addr).await?;
            let info = client
                .get_command(pb::GetCommandRequest {
                    command_id: args.id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::print_command_detail(args.format, &info, out)?;
            Ok(0)
        }
        CommandAction::Cancel(args) => {
            let mut client = connect(&args.addr).await?;
            let info = client
                .cancel_command(pb::CancelCommandRequest {
                    command_id: args.id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::print_commands(args.format, &[info], out)?;
            Ok(0)
        }
    }
}

async fn send(args: &SendArgs, out: &mut impl Write) -> anyhow::Result<u8> {
    // Checked before anything is sent (and an error, exit 1, not a usage
    // error: exit 2 means FAILED here).
    let params = match &args.params {
        Some(raw) => parse_params(raw).map_err(|e| anyhow::anyhow!("--params {e}"))?,
        None => String::new(),
    };
    let mut client = connect(&args.addr).await?;
    let mut targets = args.devices.clone();
    if !args.labels.is_empty() {
        // The hub filters: tags (which devices cannot change) and --where.
        let mut clauses = super::twin::tag_clauses(&args.labels);
        clauses.extend(args.filter.clone());
        for d in list_devices(&mut client, &clauses.join(" and ")).await? {
            if !targets.contains(&d.device_id) {
                targets.push(d.device_id);
            }
        }
    }
    anyhow::ensure!(
        !targets.is_empty(),
        "no target device: give --device, or a --tag that some device has"
    );
    let mut sent = Vec::new();
    for device in &targets {
        let info = client
            .send_command(pb::SendCommandRequest {
                device_id: device.clone(),
                name: args.name.clone(),
                params_json: params.clone(),
                ttl_ms: args.ttl.map_or(0, |t| t.as_millis() as i64),
            })
            .await
            .map_err(status_error)
            .with_context(|| format!("sending to {device}"))?
            .into_inner();
        sent.push(info);
    }
    let Some(wait) = args.wait else {
        output::print_commands(args.format, &sent, out)?;
        return Ok(0);
    };
    let waits = sent.iter().map(|info| {
        let mut client = client.clone();
        let id = info.command_id.clone();
        let fallback = info.clone();
        async move {
            let mut last = fallback;
            let stream = client
                .watch_command(pb::WatchCommandRequest {
                    command_id: id,
                    timeout_ms: wait.as_millis() as i64,
                })
                .await;
            if let Ok(stream) = stream {
                let mut stream = stream.into_inner();
                while let Ok(Some(info)) = stream.message().await {
                    last = info;
                }
            }
            last
        }
    });
    let finals = join_all(waits).await;
    output::print_commands(args.format, &finals, out)?;
    let states: Vec<pb::CommandState> = finals
        .iter()
        .map(|i| pb::CommandState::try_from(i.state).unwrap_or(pb::CommandState::Unspecified))
        .collect();
    Ok(wait_exit_code(&states))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::CommandState as S;

    #[test]
    fn params_must_be_a_json_object() {
        assert_eq!(parse_params(r#"{"hz": 5}"#).unwrap(), r#"{"hz":5}"#);
        assert!(parse_params("[1,2]").unwrap_err().contains("JSON object"));
        assert!(parse_params("5").is_err());
        assert!(
            parse_params("{oops")
                .unwrap_err()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn exit_codes_after_wait() {
        assert_eq!(wait_exit_code(&[S::Succeeded, S::Succeeded]), 0);
        assert_eq!(wait_exit_code(&[S::Succeeded, S::Failed]), 2);
        assert_eq!(wait_exit_code(&[S::Rejected]), 2);
        assert_eq!(wait_exit_code(&[S::Expired]), 3);
        assert_eq!(wait_exit_code(&[S::Failed, S::Sent]), 3);
    }

    #[test]
    fn states_and_labels_parse() {
        assert_eq!(parse_state("succeeded").unwrap(), S::Succeeded);
        assert!(parse_state("unspecified").is_err());
        assert_eq!(
            parse_label("site=lab").unwrap(),
            ("site".into(), "lab".into())
        );
        assert!(parse_label("nolabel").is_err());
    }
}
