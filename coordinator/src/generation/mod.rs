//! One generation of the group: who is in it and what it starts from.
//!
//! A generation forms at a rendezvous ([`rendezvous`]: survivors keep their
//! places, arrivals take free ones), decides where it starts from the
//! members' claims and the store ([`origin`]: a claim is evidence, not
//! truth; [`receipts`] are the proof), then trains as a [`group`] whose
//! members' step reports must agree ([`reports`]). What its handlers, the
//! Join handler and the launcher's process watchers tell the driver is
//! an [`events::Notice`].

pub(crate) mod events;
pub(crate) mod group;
pub(crate) mod origin;
pub(crate) mod receipts;
pub(crate) mod rendezvous;
pub(crate) mod reports;
