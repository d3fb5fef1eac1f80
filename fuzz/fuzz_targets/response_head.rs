//! An upstream answer's head as the own HTTP/1.1 exchange reads it
//! (`thaw_shared::upstream_h1::read_final_head`), above all the choice to pass its lines
//! on verbatim, checked against httparse's own reading of the same bytes.
//!
//! Invariants:
//! - no panic;
//! - read without `verbatim`, lines never come verbatim;
//! - a head whose lines come verbatim is one the map reads too, with the same status and
//!   body framing;
//! - lines that come verbatim are exactly the head's header lines, in order: httparse
//!   reads the same names and values from a head made of a status line, them and an
//!   empty line; every line in them ends in CRLF, with no bare LF or CR;
//! - none of them is a line a proxy must drop or re-frame (hop-by-hop, `Upgrade`,
//!   `Trailer`, `Transfer-Encoding`); exactly one is `Content-Length`, whose value is the
//!   length given; the `Date` flag says whether one is a `Date`;
//! - the answer is HTTP/1.1 with a status that has a body, and its map is left empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_shared::upstream_h1::read_final_head;

const HELD_BACK: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
];

fuzz_target!(|data: &[u8]| {
    let mapped = read_final_head(data, false);
    if let Ok(Some(head)) = &mapped {
        assert!(head.verbatim.is_none(), "verbatim lines nobody asked for");
    }
    let Ok(Some(head)) = read_final_head(data, true) else {
        return;
    };
    let Some(verbatim) = head.verbatim else {
        return;
    };
    // Nothing the map would refuse passes verbatim, and the map reads the same answer.
    let mapped = match mapped {
        Ok(Some(mapped)) => mapped,
        other => panic!("verbatim lines from a head the map refuses: {other:?}"),
    };
    assert_eq!(mapped.parts.status, head.parts.status);
    assert_eq!(mapped.decode, head.decode);
    assert!(
        head.parts.headers.is_empty(),
        "lines both verbatim and in the map"
    );
    assert_eq!(head.parts.version, http::Version::HTTP_11);
    let status = head.parts.status;
    assert!(!status.is_informational() && status != 204 && status != 304);

    let lines = verbatim.lines();
    for (at, b) in lines.iter().enumerate() {
        match b {
            b'\n' => assert!(at > 0 && lines[at - 1] == b'\r', "bare LF at {at}"),
            b'\r' => assert_eq!(lines.get(at + 1), Some(&b'\n'), "bare CR at {at}"),
            _ => {}
        }
    }
    assert!(lines.ends_with(b"\r\n"));

    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut original = httparse::Response::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = original.parse(data) else {
        panic!("verbatim lines from a head httparse does not read");
    };
    let rebuilt = [&b"HTTP/1.1 200 OK\r\n"[..], lines, b"\r\n"].concat();
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut again = httparse::Response::new(&mut slots);
    assert!(
        matches!(again.parse(&rebuilt), Ok(httparse::Status::Complete(n)) if n == rebuilt.len()),
        "the lines alone are not a head's lines"
    );
    assert_eq!(original.headers.len(), again.headers.len());
    let mut lengths = 0;
    let mut dates = 0;
    for (a, b) in original.headers.iter().zip(again.headers.iter()) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.value, b.value);
        let name = a.name.to_ascii_lowercase();
        assert!(!HELD_BACK.contains(&name.as_str()), "{name} came verbatim");
        if name == "content-length" {
            lengths += 1;
            let value = std::str::from_utf8(a.value).expect("digits");
            assert_eq!(value.parse::<u64>().ok(), Some(verbatim.content_length()));
        } else if name == "date" {
            dates += 1;
        }
    }
    assert_eq!(lengths, 1);
    for h in original.headers.iter() {
        let values: Vec<&[u8]> = mapped
            .parts
            .headers
            .get_all(h.name)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert!(values.contains(&h.value), "the map lost {}", h.name);
    }
    assert_eq!(verbatim.has_date(), dates > 0);
});
