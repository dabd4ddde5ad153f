//! The vproxy commands: `vproxy-forward-add`, `vproxy-forward-remove` and `query-vproxy`,
//! run against a `vproxy` chardev through its [`::vproxy::driver::VproxyControl`].
//!
//! A forward is given in the command-line syntax (`NAME:[BIND:]PORT`, `NAME:HOST:PORT`,
//! `NAME:unix:PATH`); a direction is `out` (an oforward: listen here, carry to the guest's
//! service) or `in` (an iforward: the guest may open the service, connected here).

use ::vproxy::driver::{control_of, ForwardDir, VproxyControl, VproxyInfo};
use ::vproxy::forward::{parse_iforward, parse_oforward};
use chardev::Registry;
use serde_json::{json, Value};

use crate::protocol::QmpError;

/// The `direction` values, in [`ForwardDir`] order of `in`, `out`.
pub const DIRECTIONS: &[&str] = &["in", "out"];

fn direction(name: &str) -> ForwardDir {
    if name == "in" {
        ForwardDir::In
    } else {
        ForwardDir::Out
    }
}

/// Run `f` on the vproxy control of chardev `id`.
fn with_vproxy<R>(
    chardevs: &mut Registry,
    id: &str,
    f: impl FnOnce(&mut dyn VproxyControl) -> std::io::Result<R>,
) -> Result<R, QmpError> {
    let result = chardevs
        .with(id, |b| control_of(b).map(f))
        .map_err(|_| QmpError::device_not_found(format!("Device '{id}' not found")))?;
    match result {
        None => Err(QmpError::generic(format!("{id} is not a vproxy device"))),
        Some(Err(e)) => Err(QmpError::generic(e.to_string())),
        Some(Ok(r)) => Ok(r),
    }
}

/// `vproxy-forward-add`: parse `forward` for `dir` ("in" or "out") and add it to `id`.
pub fn forward_add(
    chardevs: &mut Registry,
    id: &str,
    dir: &str,
    forward: &str,
) -> Result<(), QmpError> {
    let dir = direction(dir);
    let parsed = match dir {
        ForwardDir::In => parse_iforward(forward),
        ForwardDir::Out => parse_oforward(forward),
    }
    .map_err(|e| QmpError::generic(e.to_string()))?;
    with_vproxy(chardevs, id, |v| v.add_forward(dir, parsed))
}

/// `vproxy-forward-remove`: remove forward `name` of direction `dir` from `id`.
pub fn forward_remove(
    chardevs: &mut Registry,
    id: &str,
    dir: &str,
    name: &str,
) -> Result<(), QmpError> {
    with_vproxy(chardevs, id, |v| v.remove_forward(direction(dir), name))
}

/// `query-vproxy`: every vproxy chardev (or just `id`), its forwards, session and streams.
pub fn query(chardevs: &mut Registry, id: Option<&str>) -> Result<Value, QmpError> {
    let ids = match id {
        Some(id) => vec![id.to_string()],
        None => chardevs.ids(),
    };
    let mut out = Vec::new();
    for cid in ids {
        match with_vproxy(chardevs, &cid, |v| Ok(v.info())) {
            Ok(info) => out.push(describe(&cid, &info)),
            // Listing everything skips the chardevs that are not vproxies.
            Err(_) if id.is_none() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Value::Array(out))
}

/// One vproxy as `query-vproxy` shows it.
fn describe(id: &str, info: &VproxyInfo) -> Value {
    let s = &info.session;
    let streams: Vec<Value> = info
        .streams
        .iter()
        .map(|st| {
            json!({
                "id": st.id,
                "service": st.service,
                "direction": if st.outgoing { "out" } else { "in" },
                "state": st.state,
                "bytes-tx": st.bytes_tx,
                "bytes-rx": st.bytes_rx,
                "send-buffered": st.send_buffered,
                "recv-buffered": st.recv_buffered,
                "credit": st.credit,
                "window": st.window,
            })
        })
        .collect();
    json!({
        "id": id,
        "oforwards": info.oforwards.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "iforwards": info.iforwards.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "session": {
            "session-id": format!("{:016x}", s.session_id),
            "peer-session": s.peer_session.map(|p| format!("{p:016x}")),
            "up": s.up,
            "idle": s.idle,
            "frames-tx": s.frames_tx,
            "frames-rx": s.frames_rx,
            "bytes-tx": s.bytes_tx,
            "bytes-rx": s.bytes_rx,
            "crc-errors": s.crc_errors,
            "resyncs": s.resyncs,
            "protocol-errors": s.protocol_errors,
            "frames-lost": s.frames_lost,
            "retransmits": s.retransmits,
            "in-flight": s.in_flight,
            "in-flight-cap": s.in_flight_cap,
            "rate": s.rate,
            "min-rtt-us": s.min_rtt_us,
            "payload": s.payload,
            "peer-version": s.foreign_version,
            "session-resets": s.session_resets,
            "streams": s.streams,
            "buffered": s.buffered,
        },
        "streams": streams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chardev::ChardevSpec;

    fn registry() -> Registry {
        ::vproxy::register();
        let mut r = Registry::new();
        r.add(&ChardevSpec::parse("vproxy,id=vp0,oforward=web:127.0.0.1:0").unwrap())
            .unwrap();
        r.add(&ChardevSpec::parse("null,id=n0").unwrap()).unwrap();
        r
    }

    #[test]
    fn add_query_remove() {
        let mut r = registry();
        forward_add(&mut r, "vp0", "in", "ssh:127.0.0.1:22").unwrap();
        forward_add(&mut r, "vp0", "out", "ctl:127.0.0.1:0").unwrap();
        let q = query(&mut r, None).unwrap();
        assert_eq!(q.as_array().unwrap().len(), 1, "{q}");
        assert_eq!(q[0]["id"], "vp0");
        assert_eq!(q[0]["iforwards"], json!(["ssh:127.0.0.1:22"]));
        let outs = q[0]["oforwards"].as_array().unwrap();
        assert_eq!(outs.len(), 2);
        assert!(
            outs.iter().all(|o| !o.as_str().unwrap().ends_with(":0")),
            "{q}"
        );
        assert_eq!(q[0]["session"]["up"], false);
        forward_remove(&mut r, "vp0", "out", "web").unwrap();
        let q = query(&mut r, Some("vp0")).unwrap();
        assert_eq!(q[0]["oforwards"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn errors_are_qmp_errors() {
        let mut r = registry();
        let desc = |e: QmpError| e.desc;
        assert_eq!(
            desc(forward_add(&mut r, "nope", "in", "a:h:1").unwrap_err()),
            "Device 'nope' not found"
        );
        assert_eq!(
            desc(forward_add(&mut r, "n0", "in", "a:h:1").unwrap_err()),
            "n0 is not a vproxy device"
        );
        assert!(forward_add(&mut r, "vp0", "in", "bad name:h:1").is_err());
        assert!(forward_remove(&mut r, "vp0", "in", "absent").is_err());
        assert!(forward_add(&mut r, "vp0", "out", "web:127.0.0.1:0").is_err());
        assert!(query(&mut r, Some("n0")).is_err());
    }
}
