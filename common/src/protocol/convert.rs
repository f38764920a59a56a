//! Domain types to their protobuf spelling.

use super::pb;
use super::wire::{Net, WireFormat};

impl From<WireFormat> for pb::WireFormat {
    fn from(format: WireFormat) -> Self {
        match format {
            WireFormat::F32 => pb::WireFormat::F32,
            WireFormat::Bf16 => pb::WireFormat::Bf16,
            WireFormat::Int8 => pb::WireFormat::Int8,
        }
    }
}

impl From<Net> for pb::Net {
    fn from(net: Net) -> Self {
        match net {
            Net::Discriminator => pb::Net::Discriminator,
            Net::Generator => pb::Net::Generator,
        }
    }
}
