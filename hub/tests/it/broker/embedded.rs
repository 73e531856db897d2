//! A small MQTT 3.1.1 broker in the test process, for machines without
//! Mosquitto: QoS 0, 1 and 2 (a QoS 2 message is routed at its PUBREL,
//! once), retained messages, wills (also on a takeover, as Mosquitto),
//! `+`/`#` filters and `$share/<group>/` subscriptions (one member of a
//! group gets each message, in turn). Packets are framed with rumqttc's
//! codec, the crate the hub speaks MQTT with. No persistence and no TLS: a
//! restart starts empty, as the tests' Mosquitto does (`persistence
//! false`). Unlike Mosquitto, a connection writes to its client inline: a
//! client that stops reading stalls only its own connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, QoS, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Larger than any payload the hub is configured to send in the tests.
const MAX_PACKET: usize = 16 << 20;
/// A connection that sends no CONNECT within this is dropped.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Messages queued for one client; past that its messages are dropped
/// (and said so), as Mosquitto does past `max_queued_messages`.
const QUEUE: usize = 10_000;

/// Serves MQTT on 127.0.0.1:`port` until `stop` says so (or its sender is
/// dropped); then every connection is cut, without wills, like a killed
/// broker.
pub fn run(port: u16, stop: std::sync::mpsc::Receiver<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the test broker");
    runtime.block_on(async {
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("test MQTT broker: cannot listen on {port}: {e}");
                return;
            }
        };
        let (stopped_tx, mut stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = stop.recv();
            let _ = stopped_tx.send(());
        });
        let router = Arc::new(Mutex::new(Router::default()));
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        tokio::spawn(serve(socket, router.clone()));
                    }
                    Err(e) => eprintln!("test MQTT broker: accept: {e}"),
                },
            }
        }
    });
    // Dropping the runtime drops every connection's task and socket.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

struct Subscription {
    filter: String,
    /// `$share/<group>/<filter>`: one member of the group gets each message.
    group: Option<String>,
    qos: QoS,
}

impl Subscription {
    fn parse(path: &str, qos: QoS) -> Subscription {
        let (group, filter) = match path
            .strip_prefix("$share/")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((group, filter)) => (Some(group.to_string()), filter.to_string()),
            None => (None, path.to_string()),
        };
        Subscription { filter, group, qos }
    }
}

struct Client {
    /// Which connection holds the client id now (a newer one takes it over).
    conn: u64,
    outbox: mpsc::Sender<Publish>,
    /// Dropped when a newer connection takes the id: the old one ends at
    /// once, whatever its outbox still holds.
    _held: oneshot::Sender<()>,
    /// Published when the connection is lost or taken over.
    will: Option<Publish>,
    subscriptions: Vec<Subscription>,
}

/// Who gets a message: the routing decisions, with no IO inside.
#[derive(Default)]
struct Router {
    clients: HashMap<String, Client>,
    retained: BTreeMap<String, Publish>,
    next_conn: u64,
    /// The next member's turn per shared (group, filter).
    turns: HashMap<(String, String), usize>,
}

impl Router {
    /// Registers a connection under `id`; a connection that held it before
    /// is told to end and its will goes out now, before this one's CONNACK
    /// (MQTT's session takeover, as Mosquitto does it). The receiver
    /// resolves when this connection is taken over in turn.
    fn connect(
        &mut self,
        id: &str,
        outbox: mpsc::Sender<Publish>,
        will: Option<Publish>,
    ) -> (u64, oneshot::Receiver<()>) {
        self.next_conn += 1;
        let conn = self.next_conn;
        let (held, taken) = oneshot::channel();
        let client = Client {
            conn,
            outbox,
            _held: held,
            will,
            subscriptions: Vec::new(),
        };
        if let Some(old) = self.clients.insert(id.to_string(), client)
            && let Some(will) = old.will
        {
            self.publish(&will);
        }
        (conn, taken)
    }

    /// The client `id` while connection `conn` still holds it.
    fn holding(&mut self, id: &str, conn: u64) -> Option<&mut Client> {
        self.clients.get_mut(id).filter(|c| c.conn == conn)
    }

    /// Connection `conn` of `id` ended; `lost` (no DISCONNECT) publishes
    /// its will. A connection taken over no longer holds the id: nothing
    /// here (its will went out at the takeover).
    fn disconnect(&mut self, id: &str, conn: u64, lost: bool) {
        if self.holding(id, conn).is_none() {
            return;
        }
        if let Some(client) = self.clients.remove(id)
            && let (true, Some(will)) = (lost, client.will)
        {
            self.publish(&will);
        }
    }

    /// Adds the subscriptions and queues the retained messages they match
    /// (a shared subscription gets none, as in MQTT 5 and Mosquitto).
    fn subscribe(&mut self, id: &str, conn: u64, subscriptions: Vec<Subscription>) {
        // Not `holding`: that borrows all of self, and `retained` is read
        // below while the client is borrowed.
        let Some(client) = self.clients.get_mut(id).filter(|c| c.conn == conn) else {
            return;
        };
        for sub in subscriptions {
            if sub.group.is_none() {
                for (topic, message) in &self.retained {
                    if matches(&sub.filter, topic) {
                        let mut copy = message.clone();
                        copy.qos = lower(copy.qos, sub.qos);
                        queue(id, client, copy);
                    }
                }
            }
            client
                .subscriptions
                .retain(|s| (&s.filter, &s.group) != (&sub.filter, &sub.group));
            client.subscriptions.push(sub);
        }
    }

    fn unsubscribe(&mut self, id: &str, conn: u64, paths: &[String]) {
        if let Some(client) = self.holding(id, conn) {
            for path in paths {
                let gone = Subscription::parse(path, QoS::AtMostOnce);
                client
                    .subscriptions
                    .retain(|s| (&s.filter, &s.group) != (&gone.filter, &gone.group));
            }
        }
    }

    /// Keeps a retained message (an empty one clears the topic) and hands
    /// the message to every matching subscriber once, at the highest QoS
    /// its matching subscriptions granted, and to one member of each
    /// matching shared group.
    fn publish(&mut self, message: &Publish) {
        if message.retain {
            if message.payload.is_empty() {
                self.retained.remove(&message.topic);
            } else {
                let mut kept = message.clone();
                kept.dup = false;
                self.retained.insert(message.topic.clone(), kept);
            }
        }
        let mut groups: BTreeMap<(String, String), Vec<(&String, QoS)>> = BTreeMap::new();
        for (id, client) in &self.clients {
            let mut best: Option<QoS> = None;
            for sub in &client.subscriptions {
                if !matches(&sub.filter, &message.topic) {
                    continue;
                }
                match &sub.group {
                    None => best = Some(best.map_or(sub.qos, |q| higher(q, sub.qos))),
                    Some(group) => groups
                        .entry((group.clone(), sub.filter.clone()))
                        .or_default()
                        .push((id, sub.qos)),
                }
            }
            if let Some(qos) = best {
                queue(id, client, delivery(message, qos));
            }
        }
        for (key, mut members) in groups {
            members.sort_by(|a, b| a.0.cmp(b.0));
            let turn = self.turns.entry(key).or_default();
            let (id, qos) = members[*turn % members.len()];
            *turn = turn.wrapping_add(1);
            queue(id, &self.clients[id], delivery(message, qos));
        }
    }
}

/// A routed copy: MQTT 3.1.1 clears the retain flag on live delivery.
fn delivery(message: &Publish, qos: QoS) -> Publish {
    let mut copy = message.clone();
    copy.qos = lower(copy.qos, qos);
    copy.retain = false;
    copy.dup = false;
    copy
}

fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

fn higher(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) { a } else { b }
}

fn queue(id: &str, client: &Client, message: Publish) {
    if client.outbox.try_send(message).is_err() {
        eprintln!("test MQTT broker: {id}'s queue is full or gone; a message is dropped");
    }
}

/// MQTT's topic filter match: `+` is one level, a trailing `#` any number
/// (none included), and topics starting with `$` match no leading wildcard.
fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match part {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

/// The next whole packet; reads more as needed. Cancel-safe: bytes read
/// stay in `buf` for the next call.
async fn read_packet(socket: &mut OwnedReadHalf, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Some(packet),
            Err(CodecError::InsufficientBytes(_)) => match socket.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            Err(e) => {
                eprintln!("test MQTT broker: malformed packet: {e}");
                return None;
            }
        }
    }
}

/// One client connection: CONNECT, then packets in and routed messages out
/// until the client disconnects, goes quiet past its keep-alive, or is
/// taken over. A connection that ends without DISCONNECT publishes its will.
async fn serve(socket: TcpStream, router: Arc<Mutex<Router>>) {
    let peer = socket.peer_addr().map(|a| a.port()).unwrap_or_default();
    let (mut reader, mut writer) = socket.into_split();
    let mut input = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(CONNECT_WAIT, read_packet(&mut reader, &mut input)).await;
    let Ok(Some(Packet::Connect(connect))) = first else {
        return;
    };
    let (outbox, mut routed) = mpsc::channel(QUEUE);
    let id = if connect.client_id.is_empty() {
        format!("anonymous-{peer}")
    } else {
        connect.client_id.clone()
    };
    let will = connect.last_will.map(|will| {
        let mut message = Publish::from_bytes(will.topic, will.qos, will.message);
        message.retain = will.retain;
        message
    });
    let (conn, mut taken) = router.lock().unwrap().connect(&id, outbox, will);
    let mut output = BytesMut::new();
    let ack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false));
    if send(&mut writer, &mut output, &ack).await.is_err() {
        router.lock().unwrap().disconnect(&id, conn, true);
        return;
    }
    // MQTT: silent for one and a half keep-alives means gone.
    let patience = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let mut heard = Instant::now();
    let mut next_pkid: u16 = 0;
    // QoS 2 messages received, routed when their PUBREL comes.
    let mut held: HashMap<u16, Publish> = HashMap::new();
    let lost = loop {
        let quiet_until = heard + patience.unwrap_or(Duration::from_secs(86_400));
        let reply = tokio::select! {
            // Taken over by a newer connection with the same id: this one
            // ends (its will went out at the takeover).
            _ = &mut taken => break true,
            packet = read_packet(&mut reader, &mut input) => {
                heard = Instant::now();
                match packet {
                    None => break true,
                    Some(Packet::Disconnect) => break false,
                    Some(packet) => match incoming(&router, &id, conn, &mut held, packet) {
                        Ok(reply) => reply,
                        Err(()) => break true,
                    },
                }
            }
            message = routed.recv() => match message {
                None => break true,
                Some(mut message) => {
                    if message.qos != QoS::AtMostOnce {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                        message.pkid = next_pkid;
                    }
                    Some(Packet::Publish(message))
                }
            },
            _ = tokio::time::sleep_until(quiet_until) => break true,
        };
        if let Some(reply) = reply
            && send(&mut writer, &mut output, &reply).await.is_err()
        {
            break true;
        }
    };
    router.lock().unwrap().disconnect(&id, conn, lost);
}

/// What one packet from a client does; the reply to send, if any. Err: a
/// packet a client must not send (a second CONNECT, a server's packet).
fn incoming(
    router: &Mutex<Router>,
    id: &str,
    conn: u64,
    held: &mut HashMap<u16, Publish>,
    packet: Packet,
) -> Result<Option<Packet>, ()> {
    Ok(match packet {
        Packet::Publish(message) => match message.qos {
            QoS::AtMostOnce => {
                router.lock().unwrap().publish(&message);
                None
            }
            QoS::AtLeastOnce => {
                router.lock().unwrap().publish(&message);
                Some(Packet::PubAck(PubAck::new(message.pkid)))
            }
            // Held until PUBREL: a resent PUBLISH replaces it, not doubles it.
            QoS::ExactlyOnce => {
                let pkid = message.pkid;
                held.insert(pkid, message);
                Some(Packet::PubRec(PubRec::new(pkid)))
            }
        },
        Packet::PubRel(rel) => {
            if let Some(message) = held.remove(&rel.pkid) {
                router.lock().unwrap().publish(&message);
            }
            Some(Packet::PubComp(PubComp::new(rel.pkid)))
        }
        Packet::PubRec(rec) => Some(Packet::PubRel(PubRel::new(rec.pkid))),
        Packet::PubAck(_) | Packet::PubComp(_) => None,
        Packet::Subscribe(subscribe) => {
            let codes = subscribe
                .filters
                .iter()
                .map(|f| SubscribeReasonCode::Success(f.qos))
                .collect();
            let subscriptions = subscribe
                .filters
                .into_iter()
                .map(|f| Subscription::parse(&f.path, f.qos))
                .collect();
            // The SubAck goes out before the retained messages queued here:
            // they wait in the outbox until this reply is written.
            router.lock().unwrap().subscribe(id, conn, subscriptions);
            Some(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
        }
        Packet::Unsubscribe(unsubscribe) => {
            router
                .lock()
                .unwrap()
                .unsubscribe(id, conn, &unsubscribe.topics);
            Some(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
        }
        Packet::PingReq => Some(Packet::PingResp),
        Packet::Connect(_)
        | Packet::ConnAck(_)
        | Packet::SubAck(_)
        | Packet::UnsubAck(_)
        | Packet::PingResp
        | Packet::Disconnect => return Err(()),
    })
}

async fn send(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    buf: &mut BytesMut,
    packet: &Packet,
) -> Result<(), ()> {
    buf.clear();
    packet.write(buf, MAX_PACKET).map_err(|_| ())?;
    writer.write_all(buf).await.map_err(|_| ())
}

#[test]
fn filters_match_as_mqtt_says() {
    for (filter, topic, expected) in [
        ("a/b", "a/b", true),
        ("a/b", "a/b/c", false),
        ("a/+", "a/b", true),
        ("a/+", "a", false),
        ("a/+/c", "a/b/c", true),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("#", "a/b", true),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("a/b", "a/c", false),
    ] {
        assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
    }
}

#[test]
fn a_shared_group_gets_each_message_once_in_turn_and_no_retained() {
    let mut router = Router::default();
    let mut outboxes = Vec::new();
    let mut conns = HashMap::new();
    for id in ["a", "b", "plain"] {
        let (tx, rx) = mpsc::channel(16);
        conns.insert(id, router.connect(id, tx, None));
        outboxes.push(rx);
    }
    router.publish(&{
        let mut m = Publish::new("t/kept", QoS::AtLeastOnce, "old");
        m.retain = true;
        m
    });
    for id in ["a", "b"] {
        let conn = conns[id].0;
        router.subscribe(
            id,
            conn,
            vec![Subscription::parse("$share/g/t/+", QoS::AtLeastOnce)],
        );
    }
    let plain = conns["plain"].0;
    router.subscribe(
        "plain",
        plain,
        vec![Subscription::parse("t/#", QoS::AtMostOnce)],
    );
    let kept = outboxes[2]
        .try_recv()
        .expect("a plain subscriber gets the retained");
    assert!(kept.retain && kept.qos == QoS::AtMostOnce);
    for n in 0..4 {
        router.publish(&Publish::new("t/x", QoS::AtLeastOnce, format!("{n}")));
    }
    let got: Vec<usize> = outboxes
        .iter_mut()
        .map(|rx| std::iter::from_fn(|| rx.try_recv().ok()).count())
        .collect();
    assert_eq!(
        got,
        vec![2, 2, 4],
        "each shared member half, the plain one all"
    );
}

#[test]
fn a_takeover_ends_the_old_connection_publishes_its_will_once_and_ignores_its_late_subscribe() {
    let mut router = Router::default();
    let (old_tx, _old_rx) = mpsc::channel(16);
    let (watch_tx, mut watch_rx) = mpsc::channel(16);
    let (watcher, _) = router.connect("watcher", watch_tx, None);
    router.subscribe(
        "watcher",
        watcher,
        vec![Subscription::parse("x/status", QoS::AtMostOnce)],
    );
    let will = Publish::new("x/status", QoS::AtMostOnce, "offline");
    let (old, mut old_taken) = router.connect("x", old_tx, Some(will.clone()));
    let (new_tx, mut new_rx) = mpsc::channel(16);
    let (new, mut new_taken) = router.connect("x", new_tx, Some(will));
    let told = watch_rx
        .try_recv()
        .expect("the old connection's will, at the takeover");
    assert_eq!(&told.payload[..], b"offline");
    // The old connection ending later publishes nothing more.
    router.disconnect("x", old, true);
    assert!(watch_rx.try_recv().is_err(), "one will, not two");
    assert_eq!(
        old_taken.try_recv(),
        Err(oneshot::error::TryRecvError::Closed)
    );
    assert_eq!(
        new_taken.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    );
    router.subscribe(
        "x",
        old,
        vec![Subscription::parse("old/#", QoS::AtMostOnce)],
    );
    router.subscribe(
        "x",
        new,
        vec![Subscription::parse("new/#", QoS::AtMostOnce)],
    );
    router.publish(&Publish::new("old/t", QoS::AtMostOnce, "no"));
    router.publish(&Publish::new("new/t", QoS::AtMostOnce, "yes"));
    assert_eq!(new_rx.try_recv().map(|m| m.topic).as_deref(), Ok("new/t"));
    assert!(
        new_rx.try_recv().is_err(),
        "nothing from the old one's filter"
    );
}
