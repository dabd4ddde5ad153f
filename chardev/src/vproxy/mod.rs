//! vproxy: many socket streams between host and guest over one serial channel.

pub mod forward;
