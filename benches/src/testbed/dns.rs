//! The DNS server of the test kubelet node.
//!
//! Test pods run in network namespaces whose resolv.conf names this server
//! (`nameserver 10.244.N.1`, the cluster search list, `options ndots:5`), so that code
//! inside a pod — Knative's components, the proxies, the test app — finds Services by
//! their cluster names exactly as it would in a real cluster, without a real CoreDNS.
//! It answers only what those clients ask (A, with empty AAAA and other types for names
//! that exist), authoritatively and with a short TTL so the tests see Service changes
//! quickly. The names themselves come from a [`Resolver`] built elsewhere from the
//! Service/EndpointSlice cache; [`reply`] is kept pure so the wire format can be tested
//! without sockets.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

/// What the cluster knows of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Addresses(Vec<Ipv4Addr>),
    NoData,
    NxDomain,
}

/// Looks names up; implemented elsewhere from the Kubernetes Service/EndpointSlice cache.
pub trait Resolver: Send + Sync + 'static {
    /// `name` is lower-case, without the trailing dot, e.g. "autoscaler.knative-serving.svc.cluster.local".
    fn lookup(&self, name: &str) -> Answer;
}

const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_OPT: u16 = 41;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;
const NOERROR: u16 = 0;
const FORMERR: u16 = 1;
const NXDOMAIN: u16 = 3;
const NOTIMP: u16 = 4;
const REFUSED: u16 = 5;
const QR: u16 = 0x8000;
const OPCODE: u16 = 0x7800;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
/// Short, so that pods notice Services and endpoints changing during a test.
const TTL: u32 = 5;
/// The EDNS0 payload size recommended by DNS Flag Day 2020: avoids IP fragmentation.
const EDNS_PAYLOAD: u16 = 1232;
/// What every DNS transport must carry: the UDP limit without EDNS0.
const UDP_MAX: usize = 512;
const TCP_MAX: usize = 65535;
/// Both glibc and Go keep TCP connections only for a retry or two; anything idle longer
/// is a stuck client holding a task.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// One A record: pointer to the question's name, type, class, TTL, length, address.
const A_RECORD_LEN: usize = 16;
/// Root name, type OPT, payload size, extended RCODE, version, flags, no options.
#[rustfmt::skip]
const OPT_RECORD: [u8; 11] = [
    0, 0, 41, (EDNS_PAYLOAD >> 8) as u8, EDNS_PAYLOAD as u8, 0, 0, 0, 0, 0, 0,
];

/// Builds the reply to one DNS query message, or None when the bytes are not a query worth
/// answering (too short, QR bit set, etc.). Pure function, unit-tested.
///
/// `max_len` is the transport's limit for a query without EDNS0: 512 for UDP, 65535 for
/// TCP. A query with an OPT record may raise it to what it advertises, up to 1232; below
/// 512 counts as 512, as RFC 6891 asks. A reply that does not fit carries only the
/// question, with TC set, so the client retries over TCP.
pub fn reply(query: &[u8], resolver: &dyn Resolver, max_len: usize) -> Option<Vec<u8>> {
    let id = u16_at(query, 0)?;
    let flags = u16_at(query, 2)?;
    if query.len() < HEADER_LEN || flags & QR != 0 {
        return None;
    }
    // Replies copy the opcode and RD; everything else in them is ours.
    let reply_flags = QR | AA | (flags & (OPCODE | RD));
    if flags & OPCODE != 0 {
        return Some(header(id, reply_flags | NOTIMP, 0, 0, 0));
    }
    let q = match parse(query) {
        Ok(q) => q,
        Err(reason) => {
            tracing::debug!(reason, "malformed DNS query");
            return Some(header(id, reply_flags | FORMERR, 0, 0, 0));
        }
    };

    let answer = match (&q.name, q.class) {
        (_, class) if class != CLASS_IN && class != CLASS_ANY => None,
        (Some(name), _) => Some(resolver.lookup(name)),
        // A label with dots or unprintable bytes cannot be a Kubernetes name.
        (None, _) => Some(Answer::NxDomain),
    };
    let (rcode, addresses) = match answer {
        None => (REFUSED, Vec::new()),
        Some(Answer::NxDomain) => (NXDOMAIN, Vec::new()),
        Some(Answer::NoData) => (NOERROR, Vec::new()),
        Some(Answer::Addresses(a)) if q.qtype == TYPE_A || q.qtype == TYPE_ANY => (NOERROR, a),
        // The name exists but has no records of this type (AAAA included): NODATA, so that
        // clients asking A and AAAA in parallel keep the A answer.
        Some(Answer::Addresses(_)) => (NOERROR, Vec::new()),
    };

    let limit = match q.edns {
        Some(advertised) => {
            max_len.max(usize::from(advertised).clamp(UDP_MAX, usize::from(EDNS_PAYLOAD)))
        }
        None => max_len.max(UDP_MAX),
    };
    let opt_len = if q.edns.is_some() {
        OPT_RECORD.len()
    } else {
        0
    };
    let full_len = addresses
        .len()
        .saturating_mul(A_RECORD_LEN)
        .saturating_add(HEADER_LEN + q.qname.len() + 4 + opt_len);
    let ancount = u16::try_from(addresses.len())
        .ok()
        .filter(|_| full_len <= limit);
    let (tc, ancount, addresses) = match ancount {
        Some(n) => (0, n, addresses),
        None => (TC, 0, Vec::new()),
    };

    let mut out = header(
        id,
        reply_flags | tc | rcode,
        1,
        ancount,
        u16::from(q.edns.is_some()),
    );
    out.extend_from_slice(&q.qname);
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&q.class.to_be_bytes());
    for address in addresses {
        // 0xC00C: the question's name, which always starts right after the header.
        out.extend_from_slice(&[0xC0, 0x0C, 0, TYPE_A as u8, 0, CLASS_IN as u8]);
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&address.octets());
    }
    if q.edns.is_some() {
        out.extend_from_slice(&OPT_RECORD);
    }
    Some(out)
}

struct Question {
    /// Uncompressed, in the client's own letter case: some resolvers randomise case and
    /// check that the echo matches.
    qname: Vec<u8>,
    /// None when a label cannot be written as text without ambiguity.
    name: Option<String>,
    qtype: u16,
    class: u16,
    /// The UDP payload size the client advertised in an OPT record.
    edns: Option<u16>,
}

fn parse(msg: &[u8]) -> Result<Question, &'static str> {
    let count = |at| u16_at(msg, at).ok_or("header too short");
    if count(4)? != 1 {
        return Err("not exactly one question");
    }
    let (ancount, nscount, arcount) = (count(6)?, count(8)?, count(10)?);
    let question = read_name(msg, HEADER_LEN)?;
    let qtype = u16_at(msg, question.end).ok_or("question without type")?;
    let class = u16_at(msg, question.end + 2).ok_or("question without class")?;

    // The OPT record, if any, sits in the additional section, behind whatever else the
    // client put in the other sections.
    let mut edns = None;
    let mut pos = question.end + 4;
    let before_additional = u32::from(ancount) + u32::from(nscount);
    for index in 0..before_additional + u32::from(arcount) {
        let end = read_name(msg, pos)?.end;
        let rtype = u16_at(msg, end).ok_or("record without type")?;
        let rclass = u16_at(msg, end + 2).ok_or("record without class")?;
        let rdlen = u16_at(msg, end + 8).ok_or("record without length")?;
        pos = end + 10 + usize::from(rdlen);
        if pos > msg.len() {
            return Err("record data runs past the end");
        }
        if index >= before_additional && rtype == TYPE_OPT && edns.is_none() {
            edns = Some(rclass);
        }
    }
    Ok(Question {
        qname: question.wire,
        name: question.text,
        qtype,
        class,
        edns,
    })
}

struct Name {
    wire: Vec<u8>,
    text: Option<String>,
    /// Where the record continues after the name in the message.
    end: usize,
}

fn read_name(msg: &[u8], start: usize) -> Result<Name, &'static str> {
    let mut wire = Vec::new();
    let mut text = Some(String::new());
    let mut end = None;
    let mut pos = start;
    // Every pointer must land before where the current run of labels began, so each jump
    // goes strictly earlier in the message and a loop is impossible.
    let mut run_start = start;
    loop {
        let len = *msg.get(pos).ok_or("name runs past the end")?;
        match len & 0xC0 {
            0x00 => {
                let label_len = usize::from(len);
                let label = msg
                    .get(pos + 1..pos + 1 + label_len)
                    .ok_or("label runs past the end")?;
                if wire.len() + 1 + label_len > 255 {
                    return Err("name longer than 255 bytes");
                }
                wire.push(len);
                wire.extend_from_slice(label);
                pos += 1 + label_len;
                if len == 0 {
                    return Ok(Name {
                        wire,
                        text,
                        end: end.unwrap_or(pos),
                    });
                }
                if let Some(t) = text.as_mut() {
                    if label.iter().all(|&b| b.is_ascii_graphic() && b != b'.') {
                        if !t.is_empty() {
                            t.push('.');
                        }
                        t.extend(label.iter().map(|&b| char::from(b.to_ascii_lowercase())));
                    } else {
                        text = None;
                    }
                }
            }
            0xC0 => {
                let target =
                    usize::from(u16_at(msg, pos).ok_or("pointer runs past the end")? & 0x3FFF);
                if target >= run_start {
                    return Err("compression pointer does not point backwards");
                }
                end.get_or_insert(pos + 2);
                pos = target;
                run_start = target;
            }
            _ => return Err("label longer than 63 bytes or of an unknown type"),
        }
    }
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(*msg.get(at..)?.first_chunk::<2>()?))
}

fn header(id: u16, flags: u16, qdcount: u16, ancount: u16, arcount: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(UDP_MAX);
    for field in [id, flags, qdcount, ancount, 0, arcount] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out
}

/// Serves DNS on `addr` over UDP and TCP (same port) until the future is dropped. Binding
/// errors are returned at once (bind both sockets before serving).
///
/// With port 0, TCP binds the port the system gave UDP. Dropping the future also closes
/// every open TCP connection.
pub async fn serve(addr: SocketAddr, resolver: Arc<dyn Resolver>) -> io::Result<()> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(udp.local_addr()?).await?;
    tokio::try_join!(serve_udp(udp, resolver.clone()), serve_tcp(tcp, resolver)).map(|_| ())
}

async fn serve_udp(socket: UdpSocket, resolver: Arc<dyn Resolver>) -> io::Result<()> {
    let mut buf = vec![0; TCP_MAX];
    loop {
        // One bad datagram or unreachable client must not stop the server.
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "DNS UDP receive failed");
                continue;
            }
        };
        let Some(answer) = buf.get(..len).and_then(|q| reply(q, &*resolver, UDP_MAX)) else {
            continue;
        };
        if let Err(error) = socket.send_to(&answer, peer).await {
            tracing::debug!(%error, %peer, "DNS UDP send failed");
        }
    }
}

async fn serve_tcp(listener: TcpListener, resolver: Arc<dyn Resolver>) -> io::Result<()> {
    // Owning the connections here means dropping `serve` closes them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, resolver.clone()));
                }
                Err(error) => {
                    // Usually out of file descriptors: wait for some to be freed, not spin.
                    tracing::debug!(%error, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Ends on the client's close, an I/O error or idleness; none is worth reporting.
async fn serve_connection(mut stream: TcpStream, resolver: Arc<dyn Resolver>) -> io::Result<()> {
    loop {
        let mut len = [0; 2];
        within_idle(stream.read_exact(&mut len)).await?;
        let mut query = vec![0; usize::from(u16::from_be_bytes(len))];
        within_idle(stream.read_exact(&mut query)).await?;
        let Some(answer) = reply(&query, &*resolver, TCP_MAX) else {
            continue;
        };
        let Ok(answer_len) = u16::try_from(answer.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(2 + answer.len());
        framed.extend_from_slice(&answer_len.to_be_bytes());
        framed.extend_from_slice(&answer);
        within_idle(stream.write_all(&framed)).await?;
    }
}

async fn within_idle<T>(io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(TCP_IDLE, io)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    struct Cluster;

    impl Resolver for Cluster {
        fn lookup(&self, name: &str) -> Answer {
            match name {
                "one.ns.svc.cluster.local" => Answer::Addresses(vec![Ipv4Addr::new(10, 96, 0, 7)]),
                "two.ns.svc.cluster.local" => Answer::Addresses(vec![
                    Ipv4Addr::new(10, 244, 1, 5),
                    Ipv4Addr::new(10, 244, 1, 6),
                ]),
                "many.ns.svc.cluster.local" => {
                    Answer::Addresses((0..100).map(|i| Ipv4Addr::new(10, 244, 2, i)).collect())
                }
                "forty.ns.svc.cluster.local" => {
                    Answer::Addresses((0..40).map(|i| Ipv4Addr::new(10, 244, 3, i)).collect())
                }
                "empty.ns.svc.cluster.local" => Answer::Addresses(Vec::new()),
                "ns.svc.cluster.local" => Answer::NoData,
                _ => Answer::NxDomain,
            }
        }
    }

    fn encode_name(name: &str) -> Vec<u8> {
        let mut wire = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label.as_bytes());
        }
        wire.push(0);
        wire
    }

    /// A query as glibc or Go would send it, with RD set and optionally an OPT record.
    fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut msg = header(id, RD, 1, 0, u16::from(edns.is_some()));
        msg.extend(encode_name(name));
        msg.extend(qtype.to_be_bytes());
        msg.extend(CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            msg.extend([0, 0, 41]);
            msg.extend(size.to_be_bytes());
            msg.extend([0, 0, 0, 0, 0, 0]);
        }
        msg
    }

    fn ask(msg: &[u8], max_len: usize) -> Vec<u8> {
        reply(msg, &Cluster, max_len).unwrap()
    }

    fn flags(resp: &[u8]) -> u16 {
        u16_at(resp, 2).unwrap()
    }

    fn rcode(resp: &[u8]) -> u16 {
        flags(resp) & 0x000F
    }

    fn counts(resp: &[u8]) -> [u16; 4] {
        [4, 6, 8, 10].map(|at| u16_at(resp, at).unwrap())
    }

    /// The addresses of the A records that follow the echoed question.
    fn addresses(resp: &[u8], question_len: usize) -> Vec<Ipv4Addr> {
        let answers = counts(resp)[1] as usize;
        let start = HEADER_LEN + question_len;
        (0..answers)
            .map(|i| {
                let rr = &resp[start + i * A_RECORD_LEN..start + (i + 1) * A_RECORD_LEN];
                assert_eq!(rr[..12], [0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
                Ipv4Addr::new(rr[12], rr[13], rr[14], rr[15])
            })
            .collect()
    }

    #[test]
    fn answers_a_with_one_record_per_address() {
        let q = query(0xBEEF, "two.ns.svc.cluster.local", TYPE_A, None);
        let resp = ask(&q, UDP_MAX);
        assert_eq!(resp[..2], [0xBE, 0xEF]);
        assert_eq!(flags(&resp), QR | AA | RD);
        assert_eq!(counts(&resp), [1, 2, 0, 0]);
        assert_eq!(resp[HEADER_LEN..q.len()], q[HEADER_LEN..]);
        let question_len = q.len() - HEADER_LEN;
        assert_eq!(
            addresses(&resp, question_len),
            [Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 1, 6)]
        );
        assert_eq!(resp.len(), q.len() + 2 * A_RECORD_LEN);
    }

    #[test]
    fn looks_names_up_in_lower_case_and_echoes_the_clients_case() {
        let mut q = query(1, "One.NS.svc.Cluster.Local.", TYPE_A, None);
        q[2] = 0; // RD clear must stay clear
        let resp = ask(&q, UDP_MAX);
        assert_eq!(flags(&resp), QR | AA);
        assert_eq!(resp[HEADER_LEN..q.len()], q[HEADER_LEN..]);
        assert_eq!(
            addresses(&resp, q.len() - HEADER_LEN),
            [Ipv4Addr::new(10, 96, 0, 7)]
        );
    }

    #[test]
    fn any_is_answered_like_a() {
        let q = query(2, "one.ns.svc.cluster.local", TYPE_ANY, None);
        let resp = ask(&q, UDP_MAX);
        assert_eq!(
            addresses(&resp, q.len() - HEADER_LEN),
            [Ipv4Addr::new(10, 96, 0, 7)]
        );
    }

    #[test]
    fn other_types_of_existing_names_get_nodata() {
        for (name, qtype) in [
            ("one.ns.svc.cluster.local", 28),
            ("one.ns.svc.cluster.local", 16),
            ("ns.svc.cluster.local", TYPE_A),
            ("ns.svc.cluster.local", 28),
            ("empty.ns.svc.cluster.local", TYPE_A),
        ] {
            let resp = ask(&query(3, name, qtype, None), UDP_MAX);
            assert_eq!(rcode(&resp), NOERROR, "{name} {qtype}");
            assert_eq!(counts(&resp), [1, 0, 0, 0], "{name} {qtype}");
        }
    }

    #[test]
    fn unknown_names_get_nxdomain_for_every_type() {
        for qtype in [TYPE_A, 28, 16, TYPE_ANY] {
            let resp = ask(
                &query(4, "missing.ns.svc.cluster.local", qtype, None),
                UDP_MAX,
            );
            assert_eq!(flags(&resp), QR | AA | RD | NXDOMAIN);
            assert_eq!(counts(&resp), [1, 0, 0, 0]);
        }
        // A dot inside a label would otherwise alias "one.ns…".
        let mut q = query(5, "xone.ns.svc.cluster.local", TYPE_A, None);
        q[13] = b'.';
        assert_eq!(rcode(&ask(&q, UDP_MAX)), NXDOMAIN);
    }

    #[test]
    fn other_classes_are_refused() {
        let mut q = query(6, "one.ns.svc.cluster.local", TYPE_A, None);
        let class_at = q.len() - 1;
        q[class_at] = 3; // CHAOS
        assert_eq!(rcode(&ask(&q, UDP_MAX)), REFUSED);
    }

    #[test]
    fn edns_queries_get_an_opt_record_advertising_1232() {
        let q = query(7, "one.ns.svc.cluster.local", TYPE_A, Some(4096));
        let resp = ask(&q, UDP_MAX);
        assert_eq!(counts(&resp), [1, 1, 0, 1]);
        assert_eq!(
            resp[resp.len() - OPT_RECORD.len()..],
            [0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]
        );
        let question_len = q.len() - HEADER_LEN - OPT_RECORD.len();
        assert_eq!(
            addresses(&resp, question_len),
            [Ipv4Addr::new(10, 96, 0, 7)]
        );
    }

    #[test]
    fn opt_is_found_behind_other_records_with_compressed_names() {
        let mut q = query(8, "one.ns.svc.cluster.local", TYPE_A, None);
        q[11] = 2; // ARCOUNT: a TXT record whose name points at the question, then OPT
        q.extend([0xC0, 0x0C, 0, 16, 0, 1, 0, 0, 0, 0, 0, 2, 1, b'x']);
        q.extend([0, 0, 41, 0x05, 0x00, 0, 0, 0, 0, 0, 0]);
        let resp = ask(&q, UDP_MAX);
        assert_eq!(counts(&resp), [1, 1, 0, 1]);
    }

    #[test]
    fn answers_too_big_for_the_limit_are_truncated_to_the_question() {
        let many = "many.ns.svc.cluster.local";
        // 100 records are 1600 bytes: more than plain UDP and EDNS0's 1232 carry.
        for q in [
            query(9, many, TYPE_A, None),
            query(9, many, TYPE_A, Some(4096)),
        ] {
            let resp = ask(&q, UDP_MAX);
            assert_eq!(flags(&resp), QR | AA | RD | TC);
            assert_eq!(counts(&resp)[..3], [1, 0, 0]);
            assert_eq!(resp.len(), q.len());
        }
        let resp = ask(&query(9, many, TYPE_A, None), TCP_MAX);
        assert_eq!(flags(&resp) & TC, 0);
        assert_eq!(counts(&resp), [1, 100, 0, 0]);
    }

    #[test]
    fn the_advertised_size_raises_the_udp_limit_up_to_1232() {
        // 40 records are 640 bytes: over 512, under 1232.
        let fitting = |edns, max_len| {
            let q = query(10, "forty.ns.svc.cluster.local", TYPE_A, edns);
            flags(&ask(&q, max_len)) & TC == 0
        };
        assert!(!fitting(None, UDP_MAX));
        assert!(fitting(Some(1232), UDP_MAX));
        assert!(fitting(Some(65000), UDP_MAX));
        assert!(!fitting(Some(600), UDP_MAX));
        assert!(!fitting(Some(100), UDP_MAX));
        assert!(fitting(Some(100), TCP_MAX));
    }

    #[test]
    fn malformed_queries_get_formerr_with_their_id() {
        let good = query(0x1234, "one.ns.svc.cluster.local", TYPE_A, None);
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        cases.push(("no question bytes", good[..HEADER_LEN].to_vec()));
        cases.push(("no class", good[..good.len() - 2].to_vec()));
        let mut zero = good.clone();
        zero[5] = 0;
        cases.push(("qdcount 0", zero));
        let mut two = good.clone();
        two[5] = 2;
        cases.push(("qdcount 2", two));
        let mut long_label = header(0x1234, RD, 1, 0, 0);
        long_label.push(64);
        long_label.extend([b'a'; 64]);
        long_label.extend([0, 0, 1, 0, 1]);
        cases.push(("label of 64", long_label));
        let mut long_name = header(0x1234, RD, 1, 0, 0);
        for _ in 0..5 {
            long_name.push(63);
            long_name.extend([b'a'; 63]);
        }
        long_name.extend([0, 0, 1, 0, 1]);
        cases.push(("name of 321", long_name));
        let mut self_loop = header(0x1234, RD, 1, 0, 0);
        self_loop.extend([0xC0, 0x0C, 0, 1, 0, 1]);
        cases.push(("pointer to itself", self_loop));
        let mut two_step_loop = header(0x1234, RD, 1, 0, 0);
        two_step_loop.extend([1, b'a', 0xC0, 0x0C, 0, 1, 0, 1]);
        cases.push(("pointer back to its own run", two_step_loop));
        let mut forward = header(0x1234, RD, 1, 0, 0);
        forward.extend([0xC0, 0x12, 0, 1, 0, 1, 1, b'a', 0]);
        cases.push(("pointer forward", forward));
        let mut opt_past_end = query(0x1234, "one.ns.svc.cluster.local", TYPE_A, Some(1232));
        let rdlen_at = opt_past_end.len() - 1;
        opt_past_end[rdlen_at] = 4;
        cases.push(("OPT data past the end", opt_past_end));
        let mut missing_record = good.clone();
        missing_record[11] = 1;
        cases.push(("ARCOUNT without a record", missing_record));
        for (what, q) in cases {
            let resp = reply(&q, &Cluster, UDP_MAX).unwrap_or_else(|| panic!("{what}: dropped"));
            assert_eq!(resp[..2], [0x12, 0x34], "{what}");
            assert_eq!(rcode(&resp), FORMERR, "{what}");
        }
    }

    #[test]
    fn other_opcodes_get_notimp() {
        let mut q = query(11, "one.ns.svc.cluster.local", TYPE_A, None);
        q[2] |= 0x10; // opcode 2, STATUS
        let resp = ask(&q, UDP_MAX);
        assert_eq!(flags(&resp), QR | AA | RD | 0x1000 | NOTIMP);
    }

    #[test]
    fn short_messages_and_responses_are_dropped() {
        let q = query(12, "one.ns.svc.cluster.local", TYPE_A, None);
        assert!(reply(&q[..11], &Cluster, UDP_MAX).is_none());
        assert!(reply(&[], &Cluster, UDP_MAX).is_none());
        let response = ask(&q, UDP_MAX);
        assert!(reply(&response, &Cluster, UDP_MAX).is_none());
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = query(13, "one.ns.svc.cluster.local", TYPE_A, Some(1232));
        for round in 0..10_000 {
            let msg: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 600) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // Near-valid queries reach the name and record parsers, which noise rarely does.
                let mut msg = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % msg.len();
                    msg[at] = next() as u8;
                }
                msg.truncate((next() as usize) % (msg.len() + 1));
                msg
            };
            if let Some(resp) = reply(&msg, &Cluster, UDP_MAX) {
                assert!(resp.len() <= 1232, "{msg:?}");
            }
        }
    }

    /// Starts `serve` on a port free for both UDP and TCP.
    async fn start() -> SocketAddr {
        for _ in 0..20 {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = udp.local_addr().unwrap();
            if std::net::TcpListener::bind(addr).is_err() {
                continue;
            }
            drop(udp);
            let server = tokio::spawn(serve(addr, Arc::new(Cluster)));
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !server.is_finished() {
                return addr;
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    /// Fails the test instead of hanging it when the server does not answer.
    async fn soon<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .unwrap()
    }

    async fn tcp_exchange(stream: &mut TcpStream, q: &[u8]) -> Vec<u8> {
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(q);
        stream.write_all(&framed).await.unwrap();
        let mut len = [0; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut resp = vec![0; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut resp).await.unwrap();
        resp
    }

    #[tokio::test]
    async fn serves_udp_and_tcp_on_one_port() {
        let addr = start().await;

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let mut buf = [0; 2048];
        let a = query(21, "one.ns.svc.cluster.local", TYPE_A, None);
        client.send(&a).await.unwrap();
        let len = soon(client.recv(&mut buf)).await.unwrap();
        assert_eq!(buf[..len], ask(&a, UDP_MAX));
        assert_eq!(
            addresses(&buf[..len], a.len() - HEADER_LEN),
            [Ipv4Addr::new(10, 96, 0, 7)]
        );

        // Garbage gets no answer and does not stop the server.
        client.send(&[1, 2, 3]).await.unwrap();
        let many = query(22, "many.ns.svc.cluster.local", TYPE_A, Some(1232));
        client.send(&many).await.unwrap();
        let len = soon(client.recv(&mut buf)).await.unwrap();
        assert_eq!(buf[..2], [0, 22]);
        assert_eq!(flags(&buf[..len]) & TC, TC);

        // The truncated answer in full over TCP, then AAAA on the same connection.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let resp = soon(tcp_exchange(&mut stream, &many)).await;
        assert_eq!(flags(&resp) & TC, 0);
        assert_eq!(counts(&resp), [1, 100, 0, 1]);
        let aaaa = query(23, "one.ns.svc.cluster.local", 28, None);
        let resp = soon(tcp_exchange(&mut stream, &aaaa)).await;
        assert_eq!(flags(&resp), QR | AA | RD);
        assert_eq!(counts(&resp), [1, 0, 0, 0]);
    }
}
