//! The bridge's topic names, all under one prefix.

#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
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

    pub fn hub_status(&self) -> String {
        format!("{}/hub/status", self.prefix)
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
    }
}
