//! The bridge's topic names, all under one prefix.

#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    /// Several hubs on one PostgreSQL database: this hub's id (its status
    /// topic is its own) and the shared-subscription group for commands.
    cluster: Option<(String, String)>,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            cluster: None,
        }
    }

    /// Topics of hub `hub_id`, one of several in `group` (the MQTT client
    /// id the hubs share as a prefix).
    pub fn in_cluster(prefix: &str, hub_id: &str, group: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            cluster: Some((hub_id.to_owned(), group.to_owned())),
        }
    }

    pub fn device_readings(&self, device: &str) -> String {
        format!("{}/devices/{device}/readings", self.prefix)
    }

    pub fn device_status(&self, device: &str) -> String {
        format!("{}/devices/{device}/status", self.prefix)
    }

    pub fn command_events(&self, device: &str) -> String {
        format!("{}/devices/{device}/commands/events", self.prefix)
    }

    pub fn command_filter(&self) -> String {
        format!("{}/devices/+/commands", self.prefix)
    }

    /// What the hub subscribes to for commands: with several hubs a shared
    /// subscription, so each command message reaches one of them.
    pub fn command_subscription(&self) -> String {
        match &self.cluster {
            Some((_, group)) => format!("$share/{group}/{}", self.command_filter()),
            None => self.command_filter(),
        }
    }

    /// Retained: the desired document and its version.
    pub fn twin_desired(&self, device: &str) -> String {
        format!("{}/devices/{device}/twin/desired", self.prefix)
    }

    /// Each change of an alarm of the device (not retained), as webhooks
    /// get it.
    pub fn alarms(&self, device: &str) -> String {
        format!("{}/alarms/{device}", self.prefix)
    }

    /// Retained: the reported document and its version.
    pub fn twin_reported(&self, device: &str) -> String {
        format!("{}/devices/{device}/twin/reported", self.prefix)
    }

    /// Where desired changes come in (with `mqtt.commands`).
    pub fn twin_set_filter(&self) -> String {
        format!("{}/devices/+/twin/desired/set", self.prefix)
    }

    /// Like [`Self::command_subscription`], for desired changes.
    pub fn twin_set_subscription(&self) -> String {
        match &self.cluster {
            Some((_, group)) => format!("$share/{group}/{}", self.twin_set_filter()),
            None => self.twin_set_filter(),
        }
    }

    /// The device id in `{prefix}/devices/{id}/twin/desired/set`.
    pub fn device_of_twin_set_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/devices/")?
            .strip_suffix("/twin/desired/set")
            .filter(|id| !id.contains('/'))
    }

    pub fn hub_status(&self) -> String {
        match &self.cluster {
            Some((hub, _)) => format!("{}/hubs/{hub}/status", self.prefix),
            None => format!("{}/hub/status", self.prefix),
        }
    }

    pub fn errors(&self) -> String {
        format!("{}/errors", self.prefix)
    }

    /// The device id in `{prefix}/devices/{id}/commands`.
    pub fn device_of_command_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/devices/")?
            .strip_suffix("/commands")
            .filter(|id| !id.contains('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_topics() {
        let t = Topics::new("plant/a");
        assert_eq!(t.command_filter(), "plant/a/devices/+/commands");
        assert_eq!(
            t.device_of_command_topic("plant/a/devices/pump-1/commands"),
            Some("pump-1")
        );
        assert_eq!(
            t.device_of_command_topic("plant/a/devices/x/y/commands"),
            None
        );
        assert_eq!(t.device_of_command_topic("other/devices/x/commands"), None);
        assert_eq!(t.command_events("d"), "plant/a/devices/d/commands/events");
        assert_eq!(t.hub_status(), "plant/a/hub/status");
        assert_eq!(t.command_subscription(), "plant/a/devices/+/commands");
        assert_eq!(
            t.device_of_twin_set_topic("plant/a/devices/pump-1/twin/desired/set"),
            Some("pump-1")
        );
        assert_eq!(
            t.device_of_twin_set_topic("plant/a/devices/pump-1/commands"),
            None
        );
        assert_eq!(t.twin_reported("d"), "plant/a/devices/d/twin/reported");
        let c = Topics::in_cluster("plant/a", "h1", "telemetry-hub");
        assert_eq!(c.hub_status(), "plant/a/hubs/h1/status");
        assert_eq!(
            c.command_subscription(),
            "$share/telemetry-hub/plant/a/devices/+/commands"
        );
    }
}
