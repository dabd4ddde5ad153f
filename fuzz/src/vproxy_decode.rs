//! Fuzz target `vproxy_decode`: arbitrary channel bytes into the vproxy frame decoder and into an engine.
//!
//! The first byte splits the input into chunks (so chunk boundaries are fuzzed too); every
//! chunk goes to a `Decoder` and to an `Engine`'s `receive`, with the engine's output drained
//! and its timers run in between. Nothing may panic, the decoder's buffer must stay within one
//! frame and the engine's buffered bytes within its configured caps.

use std::time::{Duration, Instant};

use vproxy::wire::{Decoder, MAX_FRAME_LEN, WIRE_MAX_PAYLOAD};
use vproxy::{Engine, EngineConfig};

/// Fake time advanced per chunk.
const STEP: Duration = Duration::from_millis(250);
/// Transmit buffer size.
const OUT_BUF: usize = 512;

/// Runs one input (see the module docs).
pub fn vproxy_decode(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut now = Instant::now();
    let config = EngineConfig {
        max_streams: 8,
        stream_window: 256,
        max_stream_window: 256,
        stream_send_buffer: 256,
        session_buffer_cap: 4096,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config.clone(), 1, now);
    let mut decoder = Decoder::new();
    let mut out = [0u8; OUT_BUF];
    for piece in rest.chunks(chunk) {
        decoder.feed(piece, |f| assert!(f.payload.len() <= WIRE_MAX_PAYLOAD));
        assert!(decoder.buffered() <= MAX_FRAME_LEN);
        engine.receive(piece, now);
        while let Some(event) = engine.poll_event() {
            if let vproxy::EngineEvent::OpenRequest { id, .. } = event {
                engine.accept(id);
            }
        }
        while engine.transmit(&mut out) > 0 {}
        now += STEP;
        engine.handle_timeout(now);
        let stats = engine.session_stats();
        assert!(stats.streams <= config.max_streams);
        assert!(stats.buffered <= config.max_streams as usize * config.stream_window as usize);
    }
}
