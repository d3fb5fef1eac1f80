//! The plain-request path's reading of a client's bytes
//! (`thaw_shared::downstream_h1::take_plain_request`), checked against httparse's own
//! reading of the same bytes.
//!
//! Invariants:
//! - no panic;
//! - bytes it does not take are left exactly as they were (hyper reads them next);
//! - a request it takes is one complete HTTP/1.1 head, as httparse parses it: the same
//!   length, method, target and header lines in order; never `HEAD` or `CONNECT`, never
//!   with a body (`Content-Length` other than one `0`, `Transfer-Encoding`), an upgrade,
//!   `Expect`, or a `Connection` option other than `keep-alive`; its body is empty; and
//!   what follows the head is left.
#![no_main]

use http_body::Body;
use libfuzzer_sys::fuzz_target;
use thaw_shared::downstream_h1::take_plain_request;

fuzz_target!(|data: &[u8]| {
    let (taken, left) = take_plain_request(data);
    let Some((req, wants_trailers, used)) = taken else {
        assert_eq!(&left[..], data, "bytes not taken were changed");
        return;
    };
    assert_eq!(
        &left[..],
        &data[used..],
        "what follows the head was not left"
    );
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut oracle = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(len)) = oracle.parse(data) else {
        panic!("taken, but httparse finds no complete head");
    };
    assert_eq!(len, used);
    assert_eq!(oracle.version, Some(1));
    assert_eq!(Some(req.method().as_str()), oracle.method);
    assert!(req.method() != http::Method::HEAD && req.method() != http::Method::CONNECT);
    let target = oracle.path.map(|p| p.parse::<http::Uri>());
    assert!(
        matches!(target, Some(Ok(ref uri)) if uri == req.uri()),
        "target {target:?}"
    );
    assert!(req.body().is_end_stream());
    assert_eq!(req.headers().len(), oracle.headers.len());
    let mut lengths = 0;
    let mut te_trailers = false;
    for h in oracle.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let values: Vec<&[u8]> = req
            .headers()
            .get_all(&name)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert!(values.contains(&h.value), "{name} lost its value");
        match name.as_str() {
            "content-length" => {
                lengths += 1;
                assert_eq!(h.value, b"0");
            }
            "transfer-encoding" | "upgrade" | "expect" => panic!("{name} taken"),
            "connection" => assert!(h.value.eq_ignore_ascii_case(b"keep-alive")),
            "te" => {
                te_trailers |= h
                    .value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
            }
            _ => {}
        }
    }
    assert!(lengths <= 1);
    assert_eq!(wants_trailers, te_trailers);
});
