//! `hub twin get|set|watch` and `hub devices tag`: the twin through the
//! Operator API.

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use telemetry_proto::v1 as pb;

use super::{HubAddr, connect, status_error};
use crate::domain::shown;

#[derive(Subcommand, Debug)]
pub enum TwinAction {
    /// A device's twin: tags, desired, reported, delta and metadata, as
    /// JSON.
    Get {
        #[command(flatten)]
        addr: HubAddr,
        id: String,
    },
    /// Change a device's desired state with a JSON merge patch (null
    /// deletes a key): `hub twin set dev-1 '{"sample_rate_hz": 2}'`.
    Set {
        #[command(flatten)]
        addr: HubAddr,
        id: String,
        /// The merge patch (a JSON object).
        patch: String,
        /// Only if the desired document is at this version (else the hub
        /// refuses: FAILED_PRECONDITION).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Change the desired state of every device with these tags (and the
    /// filter): `hub twin set-all --tag site=plant-7 '{"firmware": "1.4"}'`.
    /// One JSON line per device.
    SetAll {
        #[command(flatten)]
        addr: HubAddr,
        /// key=value (repeatable, all must match; at least one).
        #[arg(long = "tag", required = true, value_parser = super::parse_label)]
        tags: Vec<(String, String)>,
        /// Only the devices this fleet filter also matches.
        #[arg(long = "where")]
        filter: Option<String>,
        /// The merge patch (a JSON object).
        patch: String,
    },
    /// Print the twin now, then every change, one JSON line each (all
    /// devices without an id).
    Watch {
        #[command(flatten)]
        addr: HubAddr,
        id: Option<String>,
    },
}

/// `hub devices tag ID site=plant-7 rack-`: set `key=value`, remove `key-`.
#[derive(Args, Debug)]
pub struct TagArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    pub id: String,
    /// `key=value` sets a tag, `key-` removes it.
    #[arg(required = true)]
    pub changes: Vec<String>,
}

/// A twin as the CLI prints it: JSON, documents as objects.
fn twin_json(t: &pb::Twin) -> Value {
    let doc = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    json!({
        "device_id": t.device_id,
        "tags": t.tags.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "desired": doc(&t.desired_json),
        "desired_version": t.desired_version,
        "reported": doc(&t.reported_json),
        "reported_version": t.reported_version,
        "delta": doc(&t.delta_json),
        "metadata": doc(&t.metadata_json),
    })
}

/// JSON text with every control character escaped (serde_json escapes
/// those below U+0020; DEL and C1 are escaped here too), so a value a
/// device reported cannot drive the operator's terminal.
fn safe_json(v: &Value) -> String {
    shown(&v.to_string()).into_owned()
}

pub async fn run(action: &TwinAction, out: &mut impl Write) -> anyhow::Result<()> {
    match action {
        TwinAction::Get { addr, id } => {
            let twin = connect(addr)
                .await?
                .get_twin(pb::GetTwinRequest {
                    device_id: id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            writeln!(out, "{}", safe_json(&twin_json(&twin)))?;
        }
        TwinAction::Set {
            addr,
            id,
            patch,
            if_version,
        } => {
            let twin = connect(addr)
                .await?
                .update_desired(pb::UpdateDesiredRequest {
                    device_id: id.clone(),
                    patch_json: patch.clone(),
                    if_version: *if_version,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            writeln!(out, "{}", safe_json(&twin_json(&twin)))?;
        }
        TwinAction::SetAll {
            addr,
            tags,
            filter,
            patch,
        } => {
            let mut client = connect(addr).await?;
            let mut clauses = tag_clauses(tags);
            clauses.extend(filter.clone());
            let devices = super::list_devices(&mut client, &clauses.join(" and ")).await?;
            anyhow::ensure!(!devices.is_empty(), "no device matches");
            for d in devices {
                let line = match client
                    .update_desired(pb::UpdateDesiredRequest {
                        device_id: d.device_id.clone(),
                        patch_json: patch.clone(),
                        if_version: None,
                    })
                    .await
                {
                    Ok(twin) => json!({
                        "device_id": d.device_id,
                        "desired_version": twin.into_inner().desired_version,
                    }),
                    Err(status) => json!({
                        "device_id": d.device_id,
                        "error": status.message(),
                    }),
                };
                writeln!(out, "{}", safe_json(&line))?;
            }
        }
        TwinAction::Watch { addr, id } => {
            let mut stream = connect(addr)
                .await?
                .watch_twin(pb::WatchTwinRequest {
                    device_id: id.clone().unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(status_error)? {
                if event.skipped > 0 {
                    eprintln!("(too slow: skipped {} changes)", event.skipped);
                }
                let part = match pb::TwinPart::try_from(event.part) {
                    Ok(pb::TwinPart::Desired) => "desired",
                    Ok(pb::TwinPart::Reported) => "reported",
                    Ok(pb::TwinPart::Tags) => "tags",
                    _ => "now",
                };
                let twin = event.twin.as_ref().map(twin_json).unwrap_or(Value::Null);
                writeln!(out, "{}", safe_json(&json!({"part": part, "twin": twin})))?;
                out.flush()?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Splits `key=value` (set) and `key-` (remove).
pub fn tag_changes(
    raw: &[String],
) -> anyhow::Result<(std::collections::HashMap<String, String>, Vec<String>)> {
    let mut set = std::collections::HashMap::new();
    let mut remove = Vec::new();
    for item in raw {
        if let Some((k, v)) = item.split_once('=') {
            set.insert(k.to_owned(), v.to_owned());
        } else if let Some(k) = item.strip_suffix('-') {
            remove.push(k.to_owned());
        } else {
            anyhow::bail!("{item:?}: write key=value to set a tag, key- to remove it");
        }
    }
    Ok((set, remove))
}

/// `hub devices tag`.
pub async fn tag(args: &TagArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let (set, remove) = tag_changes(&args.changes)?;
    let twin = connect(&args.addr)
        .await?
        .update_tags(pb::UpdateTagsRequest {
            device_id: args.id.clone(),
            set,
            remove,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let tags: std::collections::BTreeMap<_, _> = twin.tags.iter().collect();
    writeln!(out, "{}", safe_json(&json!(tags)))?;
    out.flush()?;
    Ok(())
}

/// A filter's clauses for `key=value` tag selectors (values quoted).
pub fn tag_clauses(tags: &[(String, String)]) -> Vec<String> {
    tags.iter()
        .map(|(k, v)| {
            format!(
                "tags.{k} = \"{}\"",
                v.replace('\\', "\\\\").replace('"', "\\\"")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_arguments_parse() {
        let (set, remove) =
            tag_changes(&["site=plant-7".into(), "rack-".into(), "note=a=b".into()]).unwrap();
        assert_eq!(set.get("site").map(String::as_str), Some("plant-7"));
        assert_eq!(set.get("note").map(String::as_str), Some("a=b"));
        assert_eq!(remove, vec!["rack".to_owned()]);
        assert!(tag_changes(&["bare".into()]).is_err());
        let clauses = tag_clauses(&[("site".into(), "a \"b\"".into())]);
        let filter = crate::twin::filter::parse(&clauses.join(" and ")).unwrap();
        let want: std::collections::BTreeMap<String, String> =
            [("site".to_owned(), "a \"b\"".to_owned())].into();
        assert_eq!(filter, crate::twin::filter::Filter::tags(&want));
    }
}
