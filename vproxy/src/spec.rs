//! The `vproxy` chardev kind: its options (`oforward=`, `iforward=`, `rate=`, `window=`,
//! `max-streams=`) and its registration with the chardev parser, which knows it by nothing
//! but its name.
//!
//! `vproxy[,oforward=NAME:[BIND:]PORT]...[,iforward=NAME:HOST:PORT]...[,rate=N][,window=N]
//! [,max-streams=N]`

use chardev::error::SpecError;
use chardev::spec::{register_kind, BackendKind, Opts};
use chardev::Backend;

use crate::driver::VproxyBackend;
use crate::forward::{parse_iforward, parse_oforward, Forward, IFORWARD, OFORWARD};

/// The kind's name in `--chardev`.
pub const KIND: &str = "vproxy";
/// Largest `rate=`, in bytes per second.
pub const MAX_VPROXY_RATE: u64 = 1 << 30;
/// Smallest `window=`.
pub const MIN_VPROXY_WINDOW: u64 = 1 << 10;
/// Largest `window=`.
pub const MAX_VPROXY_WINDOW: u64 = 16 << 20;
/// Largest `max-streams=`.
pub const MAX_VPROXY_STREAMS: u64 = 1 << 16;

/// A `vproxy` chardev's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VproxySpec {
    /// Local listeners whose connections open the peer's service of the same name.
    pub oforwards: Vec<Forward>,
    /// Services the peer may open, and where each is connected.
    pub iforwards: Vec<Forward>,
    /// The channel's speed in bytes per second (`rate=`): the first windows and frames,
    /// until the engine has measured the channel.
    pub rate: Option<u64>,
    /// A fixed receive window per stream in bytes (`window=`), instead of the growing one.
    pub window: Option<u32>,
    /// Most streams at once (`max-streams=`; the engine's default otherwise).
    pub max_streams: Option<u32>,
}

fn forwards(
    o: &mut Opts,
    key: &'static str,
    parse: fn(&str) -> Result<Forward, SpecError>,
) -> Result<Vec<Forward>, SpecError> {
    let mut out: Vec<Forward> = Vec::new();
    while let Some(v) = o.string(key)? {
        let f = parse(&v).map_err(|e| e.in_chardev(o.id()))?;
        if out.iter().any(|g| g.name == f.name) {
            return Err(o.bad(key, &v, "a service name not used by another forward"));
        }
        out.push(f);
    }
    Ok(out)
}

impl VproxySpec {
    /// Read the vproxy options from `o`.
    pub fn parse(o: &mut Opts) -> Result<VproxySpec, SpecError> {
        let oforwards = forwards(o, OFORWARD, parse_oforward)?;
        let iforwards = forwards(o, IFORWARD, parse_iforward)?;
        const RATE: &str = "a rate in bytes per second from 1 to 1G";
        let rate = o.size("rate", MAX_VPROXY_RATE, RATE)?;
        if rate == Some(0) {
            return Err(o.bad("rate", "0", RATE));
        }
        const WINDOW: &str = "a size from 1K to 16M";
        let window = match o.size("window", MAX_VPROXY_WINDOW, WINDOW)? {
            Some(w) if w < MIN_VPROXY_WINDOW => {
                return Err(o.bad("window", &w.to_string(), WINDOW))
            }
            // At most MAX_VPROXY_WINDOW, which fits.
            Some(w) => Some(w as u32),
            None => None,
        };
        const STREAMS: &str = "a stream count from 1 to 65536";
        let max_streams = match o.size("max-streams", MAX_VPROXY_STREAMS, STREAMS)? {
            Some(0) => return Err(o.bad("max-streams", "0", STREAMS)),
            // At most MAX_VPROXY_STREAMS, which fits.
            Some(n) => Some(n as u32),
            None => None,
        };
        Ok(VproxySpec {
            oforwards,
            iforwards,
            rate,
            window,
            max_streams,
        })
    }

    /// The options in canonical form and order (what `--chardev` prints back).
    pub fn to_options(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for f in &self.oforwards {
            out.push((OFORWARD.to_string(), f.to_string()));
        }
        for f in &self.iforwards {
            out.push((IFORWARD.to_string(), f.to_string()));
        }
        if let Some(rate) = self.rate {
            out.push(("rate".to_string(), rate.to_string()));
        }
        if let Some(window) = self.window {
            out.push(("window".to_string(), window.to_string()));
        }
        if let Some(n) = self.max_streams {
            out.push(("max-streams".to_string(), n.to_string()));
        }
        out
    }

    /// The spec of chardev `id` from its canonical options.
    pub fn from_options(id: &str, options: &[(String, String)]) -> Result<VproxySpec, SpecError> {
        let tokens: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut o = Opts::new(KIND, &tokens, Some(id.to_string()))?;
        let spec = VproxySpec::parse(&mut o)?;
        o.finish()?;
        Ok(spec)
    }
}

/// The `vproxy` kind as the chardev parser and `chardev::create` see it.
struct VproxyKind;

impl BackendKind for VproxyKind {
    fn name(&self) -> &'static str {
        KIND
    }

    fn repeatable(&self) -> &'static [&'static str] {
        &[OFORWARD, IFORWARD]
    }

    fn parse(&self, o: &mut Opts) -> Result<Vec<(String, String)>, SpecError> {
        Ok(VproxySpec::parse(o)?.to_options())
    }

    fn create(&self, id: &str, options: &[(String, String)]) -> chardev::Result<Box<dyn Backend>> {
        let spec = VproxySpec::from_options(id, options)?;
        Ok(Box::new(VproxyBackend::open(id, &spec)?))
    }
}

static VPROXY_KIND: VproxyKind = VproxyKind;

/// Make `--chardev vproxy,...` known to the chardev parser and registry in this process
/// (idempotent). The VMM calls it before it parses its command line.
pub fn register() {
    register_kind(&VPROXY_KIND);
}

/// The `vproxy` spec of a parsed chardev spec, if it is one.
pub fn of(spec: &chardev::ChardevSpec) -> Option<VproxySpec> {
    match &spec.backend {
        chardev::BackendSpec::Extension(e) if e.kind == KIND => {
            VproxySpec::from_options(&spec.id, &e.options).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chardev::spec::ChardevSpec;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn parse(s: &str) -> Result<ChardevSpec, SpecError> {
        register();
        ChardevSpec::parse(s)
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    fn spec_of(s: &ChardevSpec) -> VproxySpec {
        of(s).unwrap_or_else(|| panic!("not a vproxy: {s:?}"))
    }

    #[test]
    fn vproxy_repeated_forwards_and_knobs() {
        use crate::forward::Endpoint;
        let s = parse(
            "vproxy,id=vp0,oforward=web:8080,iforward=ssh:127.0.0.1:22,oforward=ctl:unix:/tmp/c,,1,rate=11520,window=4K",
        )
        .unwrap();
        let v = &spec_of(&s);
        assert_eq!(v.oforwards.len(), 2);
        assert_eq!(v.oforwards[0].name, "web");
        assert_eq!(
            v.oforwards[0].endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(v.oforwards[1].endpoint, Endpoint::Unix("/tmp/c,1".into()));
        assert_eq!(v.iforwards.len(), 1);
        assert_eq!(v.iforwards[0].to_string(), "ssh:127.0.0.1:22");
        assert_eq!((v.rate, v.window), (Some(11520), Some(4096)));
        assert_eq!(
            s.to_string(),
            "vproxy,id=vp0,oforward=web:127.0.0.1:8080,oforward=ctl:unix:/tmp/c,,1,iforward=ssh:127.0.0.1:22,rate=11520,window=4096"
        );
        assert_eq!(parse(&s.to_string()), Ok(s.clone()));
        // No forwards at all is fine: they can be added at run time.
        let s = parse("vproxy,id=vp1").unwrap();
        assert_eq!(s.backend.kind(), "vproxy");
        assert_eq!(s.to_string(), "vproxy,id=vp1");
    }

    #[test]
    fn vproxy_rejections() {
        assert_eq!(
            err("vproxy,id=vp0,oforward=web"),
            "chardev 'vp0': bad oforward 'web': expected NAME:[BIND:]PORT or NAME:unix:PATH"
        );
        assert_eq!(
            err("vproxy,id=vp0,iforward=s/sh:h:22"),
            "chardev 'vp0': bad iforward 's/sh:h:22': bad service name 's/sh' (1 to 64 of A-Z a-z 0-9 . _ -)"
        );
        assert_eq!(
            err("vproxy,id=vp0,iforward=ssh:h:22,iforward=ssh:h:23"),
            "chardev 'vp0': bad value 'ssh:h:23' for option 'iforward' (expected a service name not used by another forward)"
        );
        assert_eq!(
            err("vproxy,id=vp0,oforward"),
            "chardev 'vp0': option 'oforward' needs a value"
        );
        assert_eq!(
            err("vproxy,id=vp0,rate=0"),
            "chardev 'vp0': bad value '0' for option 'rate' (expected a rate in bytes per second from 1 to 1G)"
        );
        assert_eq!(
            err("vproxy,id=vp0,window=100"),
            "chardev 'vp0': bad value '100' for option 'window' (expected a size from 1K to 16M)"
        );
        assert_eq!(
            err("vproxy,id=vp0,window=1G"),
            "chardev 'vp0': bad value '1G' for option 'window' (expected a size from 1K to 16M)"
        );
        assert_eq!(
            err("vproxy,id=vp0,rate=1,rate=2"),
            "chardev 'vp0': option 'rate' given twice"
        );
    }

    fn arb_vproxy() -> impl Strategy<Value = VproxySpec> {
        use crate::forward::Endpoint;
        let endpoint = prop_oneof![
            ("[a-z0-9.]{1,10}", 1u16..)
                .prop_filter("'unix' starts a path", |(h, _)| h != "unix")
                .prop_map(|(host, port)| Endpoint::Tcp { host, port }),
            "/[^\u{0}]{1,16}".prop_map(|p| Endpoint::Unix(PathBuf::from(p))),
        ];
        let forwards =
            prop::collection::btree_map("[a-z0-9._-]{1,8}", endpoint, 0..4).prop_map(|m| {
                m.into_iter()
                    .map(|(name, endpoint)| Forward { name, endpoint })
                    .collect::<Vec<_>>()
            });
        (
            forwards.clone(),
            forwards,
            proptest::option::of(1..=MAX_VPROXY_RATE),
            proptest::option::of(MIN_VPROXY_WINDOW as u32..=MAX_VPROXY_WINDOW as u32),
            proptest::option::of(1..=MAX_VPROXY_STREAMS as u32),
        )
            .prop_map(
                |(oforwards, iforwards, rate, window, max_streams)| VproxySpec {
                    oforwards,
                    iforwards,
                    rate,
                    window,
                    max_streams,
                },
            )
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(v in arb_vproxy()) {
            let options = v.to_options();
            let spec = ChardevSpec {
                id: "vp0".into(),
                backend: chardev::BackendSpec::Extension(chardev::spec::ExtensionSpec {
                    kind: KIND,
                    options,
                }),
                log: None,
                mux: false,
            };
            let again = parse(&spec.to_string()).unwrap();
            prop_assert_eq!(spec_of(&again), v);
            prop_assert_eq!(again, spec);
        }
    }
}
