//! Code generated from `proto/gancluster.proto`: the coordinator service
//! and its messages. Conversions to domain types live next to the code
//! that uses them.
#![allow(missing_docs)]

tonic::include_proto!("gancluster.v1");

/// Bumped on any incompatible change to the wire contract; a worker of
/// another version is refused at join.
pub const PROTOCOL_VERSION: u32 = 7;

#[cfg(test)]
mod tests {
    /// The contract and the architecture document name the version the code speaks.
    #[test]
    fn the_proto_and_the_docs_name_this_protocol_version() {
        let proto = include_str!("../../../proto/gancluster.proto");
        let readme = include_str!("../../../docs/architecture.md");
        let version = super::PROTOCOL_VERSION;
        assert!(
            proto.contains(&format!("// Protocol version {version} ")),
            "the .proto"
        );
        assert!(
            readme.contains(&format!("`gancluster.v1`, version {version},")),
            "docs/architecture.md"
        );
    }
}
