//! The protobufs of an event file, field for field as TensorFlow's
//! `tensorflow/core/util/event.proto`, `tensorflow/core/framework/summary.proto`
//! and `tensor.proto` number them (only the fields written here).

/// One entry of an event file.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The training step it belongs to.
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// What an [`Event`] holds.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum What {
    /// The file's first event: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Values of the step.
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// A (re)start of the writing program.
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// The values of one step.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// One tagged value.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 4, 8")]
    pub kind: Option<Kind>,
}

/// What a [`Value`] is.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Kind {
    /// A scalar (TensorBoard's Scalars tab).
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    /// An encoded image (the Images tab).
    #[prost(message, tag = "4")]
    Image(Image),
    /// A tensor, here a string for the Text tab.
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// An encoded image and its size.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// Which TensorBoard plugin shows a value.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// A plugin's name and its (here empty) settings.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// A tensor; only strings are written.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct TensorProto {
    /// `DataType`: 7 is `DT_STRING`.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// A tensor's shape; none is a scalar.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// One dimension of a [`TensorShape`].
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// A restart marker.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SessionLog {
    /// 1: START. TensorBoard drops what earlier files hold at this step
    /// and after: the run went back there.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `DT_STRING` in TensorFlow's `DataType`.
pub(super) const DT_STRING: i32 = 7;

/// `SessionLog.START`.
pub(super) const SESSION_START: i32 = 1;

/// `colorspace` of an RGB image.
pub(super) const RGB: i32 = 3;
