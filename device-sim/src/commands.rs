//! What a simulated device does with commands: reply RECEIVED at once, then
//! execute and reply the final state; a command id seen before is not run
//! again (the hub delivers at least once), its final reply is repeated.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};
use telemetry_proto::v1::{self as pb, CommandStatus};

/// Command ids remembered for deduplication.
const REMEMBERED: usize = 1024;

/// A change to the device the command asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    SetRate(f64),
    SetBatch(usize),
    /// Drop the stream, come back after this long, keep the seq.
    Reboot(Duration),
}

#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub replies: Vec<pb::CommandReply>,
    pub effect: Option<Effect>,
    /// False for a duplicate (already executed).
    pub executed: bool,
}

#[derive(Default)]
pub struct CommandRunner {
    /// (command id, its final reply), oldest first.
    recent: VecDeque<(String, pb::CommandReply)>,
}

fn reply(id: &str, status: CommandStatus, detail: &str, result: Option<Value>) -> pb::CommandReply {
    pb::CommandReply {
        command_id: id.to_owned(),
        status: status as i32,
        detail: detail.to_owned(),
        result_json: result.map(|r| r.to_string()).unwrap_or_default(),
    }
}

impl CommandRunner {
    pub fn handle(&mut self, cmd: &pb::Command, now_ms: i64) -> Outcome {
        if let Some((_, done)) = self.recent.iter().find(|(id, _)| *id == cmd.command_id) {
            return Outcome {
                replies: vec![done.clone()],
                effect: None,
                executed: false,
            };
        }
        let received = reply(&cmd.command_id, CommandStatus::Received, "", None);
        let (done, effect) = if cmd.expires_at_ms > 0 && cmd.expires_at_ms < now_ms {
            (
                reply(&cmd.command_id, CommandStatus::Rejected, "expired", None),
                None,
            )
        } else {
            execute(cmd, now_ms)
        };
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent
            .push_back((cmd.command_id.clone(), done.clone()));
        Outcome {
            replies: vec![received, done],
            effect,
            executed: true,
        }
    }
}

fn execute(cmd: &pb::Command, now_ms: i64) -> (pb::CommandReply, Option<Effect>) {
    let id = cmd.command_id.as_str();
    let params: Value = serde_json::from_str(if cmd.params_json.is_empty() {
        "{}"
    } else {
        &cmd.params_json
    })
    .unwrap_or(Value::Null);
    let bad = |what: &str| {
        (
            reply(
                id,
                CommandStatus::Failed,
                &format!("bad params: {what}"),
                None,
            ),
            None,
        )
    };
    match cmd.name.as_str() {
        "ping" => (
            reply(
                id,
                CommandStatus::Succeeded,
                "",
                Some(json!({ "pong": now_ms })),
            ),
            None,
        ),
        "set_rate" => match params.get("hz").and_then(Value::as_f64) {
            Some(hz) if hz.is_finite() && hz >= 0.0 => (
                reply(id, CommandStatus::Succeeded, "", Some(json!({ "hz": hz }))),
                Some(Effect::SetRate(hz)),
            ),
            _ => bad("expected {\"hz\": number >= 0}"),
        },
        "set_batch" => match params.get("max").and_then(Value::as_u64) {
            Some(max) if max >= 1 => (
                reply(
                    id,
                    CommandStatus::Succeeded,
                    "",
                    Some(json!({ "max": max })),
                ),
                Some(Effect::SetBatch(max as usize)),
            ),
            _ => bad("expected {\"max\": integer >= 1}"),
        },
        "reboot" => {
            let delay = params.get("delay_ms").and_then(Value::as_u64).unwrap_or(0);
            (
                reply(id, CommandStatus::Succeeded, "rebooting", None),
                Some(Effect::Reboot(Duration::from_millis(delay))),
            )
        }
        "fail" => {
            let message = params
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("failed on request");
            (reply(id, CommandStatus::Failed, message, None), None)
        }
        other => (
            reply(
                id,
                CommandStatus::Rejected,
                &format!("unknown command: {other}"),
                None,
            ),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str, name: &str, params: &str) -> pb::Command {
        pb::Command {
            command_id: id.into(),
            name: name.into(),
            params_json: params.into(),
            expires_at_ms: 0,
        }
    }

    fn statuses(o: &Outcome) -> Vec<i32> {
        o.replies.iter().map(|r| r.status).collect()
    }

    #[test]
    fn received_then_final_and_duplicates_run_once() {
        let mut runner = CommandRunner::default();
        let first = runner.handle(&cmd("c1", "set_rate", r#"{"hz": 2.5}"#), 10);
        assert!(first.executed);
        assert_eq!(
            statuses(&first),
            vec![
                CommandStatus::Received as i32,
                CommandStatus::Succeeded as i32
            ]
        );
        assert_eq!(first.effect, Some(Effect::SetRate(2.5)));
        let again = runner.handle(&cmd("c1", "set_rate", r#"{"hz": 2.5}"#), 20);
        assert!(!again.executed);
        assert_eq!(again.effect, None);
        assert_eq!(again.replies, vec![first.replies[1].clone()]);
    }

    #[test]
    fn every_command_of_the_simulator() {
        let mut r = CommandRunner::default();
        let ping = r.handle(&cmd("p", "ping", ""), 1234);
        assert_eq!(ping.replies[1].result_json, r#"{"pong":1234}"#);
        let fail = r.handle(&cmd("f", "fail", r#"{"message": "boom"}"#), 0);
        assert_eq!(fail.replies[1].status, CommandStatus::Failed as i32);
        assert_eq!(fail.replies[1].detail, "boom");
        let unknown = r.handle(&cmd("u", "dance", ""), 0);
        assert_eq!(unknown.replies[1].status, CommandStatus::Rejected as i32);
        assert_eq!(unknown.replies[1].detail, "unknown command: dance");
        let batch = r.handle(&cmd("b", "set_batch", r#"{"max": 7}"#), 0);
        assert_eq!(batch.effect, Some(Effect::SetBatch(7)));
        let bad = r.handle(&cmd("b2", "set_batch", r#"{"max": 0}"#), 0);
        assert_eq!(bad.replies[1].status, CommandStatus::Failed as i32);
        let reboot = r.handle(&cmd("r", "reboot", r#"{"delay_ms": 300}"#), 0);
        assert_eq!(
            reboot.effect,
            Some(Effect::Reboot(Duration::from_millis(300)))
        );
        let mut late = cmd("e", "ping", "");
        late.expires_at_ms = 5;
        let expired = r.handle(&late, 10);
        assert_eq!(expired.replies[1].status, CommandStatus::Rejected as i32);
    }
}
