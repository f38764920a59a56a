//! Post-local SGD's averaging step: a network's optimizer state as one flat
//! vector, and back.
//!
//! With `train.sync_every` = H each replica trains H steps on its own
//! gradients; then every replica flattens, per network, its trainable
//! parameters and Adam's two moments (`[parameters…, first moments…,
//! second moments…]`, each in the visitor order [`crate::model::params`] uses for
//! gradients), the coordinator averages the vectors as it averages
//! gradients, and every replica loads the mean, so all hold the same
//! state again. Adam's step count is the same everywhere (under the halt
//! policy no rank skips a step alone) and stays. BatchNorm running
//! statistics are not averaged: training never reads them (it normalises
//! with batch statistics), and rank 0's, the ones its samples, SWD and
//! checkpoints use, are kept whole, as PyTorch's model averagers do.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{Adam, AdamState, AdaptiveMomentumState, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::model::params;

/// A network's Adam optimizer.
pub type AdamOf<M, B> = OptimizerAdaptor<Adam, M, B>;

/// Its per-parameter states.
type Records<M, B> = <AdamOf<M, B> as Optimizer<M, B>>::Record;

/// A state that cannot be averaged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AveragingError {
    /// A parameter has never been stepped, so it has no moments to average.
    #[error(
        "parameter {0} has no Adam state: averaging follows at least one local step \
         (a bug if seen)"
    )]
    NoState(ParamId),
    /// The averaged vector does not fit the network.
    #[error(
        "the averaged state has {got} elements, but this network's is {expected} \
         (3 × its trainable parameters): the replicas' models differ"
    )]
    Length {
        /// Elements received.
        got: usize,
        /// Elements expected.
        expected: usize,
    },
}

/// `module`'s parameters and `optimizer`'s moments as one flat vector.
pub fn state<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    optimizer: &AdamOf<M, B>,
) -> Result<Vec<f32>, AveragingError> {
    struct Collect<'a, M: AutodiffModule<B>, B: AutodiffBackend> {
        records: &'a Records<M, B>,
        moments: [Vec<f32>; 2],
        missing: Option<ParamId>,
    }
    impl<M: AutodiffModule<B>, B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, M, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !param.val().is_require_grad() {
                return;
            }
            let Some(AdaptorRecord::V1(record)) = self.records.get(&param.id) else {
                self.missing.get_or_insert(param.id);
                return;
            };
            let momentum = record.clone().into_state::<D>().momentum;
            for (out, moment) in self
                .moments
                .iter_mut()
                .zip([momentum.moment_1, momentum.moment_2])
            {
                out.extend(flat(moment));
            }
        }
    }
    let records = optimizer.to_record();
    let mut collect = Collect::<M, B> {
        records: &records,
        moments: Default::default(),
        missing: None,
    };
    module.visit(&mut collect);
    if let Some(id) = collect.missing {
        return Err(AveragingError::NoState(id));
    }
    let mut out = params::flat_params(module);
    let [first, second] = collect.moments;
    out.reserve(first.len() + second.len());
    out.extend(first);
    out.extend(second);
    Ok(out)
}

/// `module` with the parameters of `averaged` (laid out as [`state`]
/// writes it), and `optimizer` with its moments.
pub fn load<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: M,
    optimizer: &mut AdamOf<M, B>,
    averaged: &[f32],
) -> Result<M, AveragingError> {
    struct Load<'a, M: AutodiffModule<B>, B: AutodiffBackend> {
        records: &'a mut Records<M, B>,
        parts: [&'a [f32]; 3],
        missing: Option<ParamId>,
    }
    impl<M: AutodiffModule<B>, B: AutodiffBackend> ModuleMapper<B> for Load<'_, M, B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let value = param.val();
            if !value.is_require_grad() {
                return param;
            }
            let (dims, device) = (value.dims(), value.device());
            let split = self
                .parts
                .map(|part| part.split_at(value.shape().num_elements()));
            self.parts = split.map(|(_, rest)| rest);
            let [values, first, second] = split.map(|(head, _)| head);
            let tensor = |flat: &[f32]| TensorData::new(flat.to_vec(), dims);
            match self.records.get(&param.id) {
                Some(AdaptorRecord::V1(record)) => {
                    let old = record.clone().into_state::<D>().momentum;
                    let momentum = AdaptiveMomentumState {
                        time: old.time,
                        moment_1: Tensor::from_data(tensor(first), &device),
                        moment_2: Tensor::from_data(tensor(second), &device),
                        max_moment_2: old.max_moment_2,
                    };
                    let record = AdaptorRecordV1::from_state(AdamState { momentum });
                    self.records.insert(param.id, AdaptorRecord::V1(record));
                }
                None => {
                    self.missing.get_or_insert(param.id);
                }
            }
            param.map(|_| Tensor::from_data(tensor(values), &device).require_grad())
        }
    }
    let len = params::trainable_len(&module);
    if averaged.len() != 3 * len {
        return Err(AveragingError::Length {
            got: averaged.len(),
            expected: 3 * len,
        });
    }
    let (values, moments) = averaged.split_at(len);
    let (first, second) = moments.split_at(len);
    let mut records = optimizer.to_record();
    let mut mapper = Load::<M, B> {
        records: &mut records,
        parts: [values, first, second],
        missing: None,
    };
    let module = module.map(&mut mapper);
    if let Some(id) = mapper.missing {
        return Err(AveragingError::NoState(id));
    }
    *optimizer = optimizer.clone().load_record(records);
    Ok(module)
}

/// A tensor's elements as f32.
fn flat<B: burn::tensor::backend::Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("tensor converted to f32")
}
