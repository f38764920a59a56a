"""PyTorch's reference DCGAN step on gancluster's inputs, for the parity harness.

Usage:  worker parity --tapes DIR [flags]     # writes DIR/inputs.{json,f32}, DIR/ours.{json,f32}
        python3 scripts/parity/dcgan_parity.py DIR   # writes DIR/torch.{json,f32}
        worker parity --tapes DIR --against DIR [same flags]   # compares, tensor by tensor

Needs only torch (no numpy).

The reference modules and step are those of pytorch/examples' dcgan (and of
../shared/bench/dcgan_torch_train.py): nn.Sequential G and D with bias-free
4x4 (transposed) convolutions, BatchNorm2d (momentum 0.1, eps 1e-5), ReLU /
LeakyReLU(0.2), Tanh; BCEWithLogits; Adam(lr, betas, eps 1e-8); per step a D
update on a real and a detached fake batch (separate forward passes), then a
G update through the updated D with the fakes of the same forward pass. Our
initial weights, real batches and noise are loaded, so the two runs differ
only in arithmetic. Records what `worker parity` records, under the same
names, in the same tape format (a JSON index and a little-endian f32 blob).
"""
import array
import hashlib
import json
import sys

import torch
import torch.nn as nn


def read_tape(directory, stem):
    index = json.load(open(f"{directory}/{stem}.json"))
    values = array.array("f")
    values.frombytes(open(f"{directory}/{stem}.f32", "rb").read())
    if sys.byteorder != "little":
        values.byteswap()
    tensors = {}
    for e in index["tensors"]:
        part = values[e["offset"]:e["offset"] + e["len"]]
        tensors[e["name"]] = torch.tensor(part.tolist(), dtype=torch.float32).reshape(e["shape"])
    return index["meta"], tensors


def write_tape(directory, stem, meta, tensors):
    entries, blob, offset = [], array.array("f"), 0
    for name, t in tensors:
        values = t.detach().to(torch.float32).contiguous().view(-1).tolist()
        entries.append({"name": name, "shape": list(t.shape), "offset": offset, "len": len(values)})
        blob.extend(values)
        offset += len(values)
    if sys.byteorder != "little":
        blob.byteswap()
    json.dump({"meta": meta, "tensors": entries}, open(f"{directory}/{stem}.json", "w"), indent=1)
    open(f"{directory}/{stem}.f32", "wb").write(blob.tobytes())


def generator(nz, ngf, depth):
    ch = ngf << (depth - 1)
    layers = [nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
    for _ in range(1, depth):
        layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
        ch //= 2
    layers += [nn.ConvTranspose2d(ch, 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def discriminator(ndf, depth):
    ch = ndf
    layers = [nn.Conv2d(3, ch, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for _ in range(1, depth):
        layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
        ch *= 2
    layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]
    return nn.Sequential(*layers)


def load(module, tensors, prefix):
    state = module.state_dict()
    for key in state:
        if key.endswith("num_batches_tracked"):
            continue
        state[key] = tensors[f"{prefix}.{key}"].clone()
    module.load_state_dict(state)


def named_state(module, prefix):
    return [(f"{prefix}.{k}", v.clone()) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]


def main(directory):
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    meta, inputs = read_tape(directory, "inputs")
    size, nz, ngf, ndf = (int(meta[k]) for k in ("image_size", "nz", "ngf", "ndf"))
    batch, steps = int(meta["batch"]), int(meta["steps"])
    lr, betas = float(meta["lr"]), (float(meta["beta1"]), float(meta["beta2"]))
    depth = (size.bit_length() - 1) - 2
    g, d = generator(nz, ngf, depth), discriminator(ndf, depth)
    load(g, inputs, "init.G")
    load(d, inputs, "init.D")
    opt_g = torch.optim.Adam(g.parameters(), lr, betas=betas, eps=1e-8)
    opt_d = torch.optim.Adam(d.parameters(), lr, betas=betas, eps=1e-8)
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    out = []
    for step in range(steps):
        real = inputs[f"real.{step}"]
        z = inputs[f"noise.{step}"].view(batch, nz, 1, 1)
        fake = g(z)
        d.zero_grad()
        real_logits = d(real).view(-1)
        fake_logits = d(fake.detach()).view(-1)
        err_d = bce(real_logits, ones) + bce(fake_logits, zeros)
        err_d.backward()
        if step in (0, 1):
            out += [(f"grad.{step}.D.{k}", p.grad.clone()) for k, p in d.named_parameters()]
        opt_d.step()
        g.zero_grad()
        err_g = bce(d(fake).view(-1), ones)
        err_g.backward()
        if step in (0, 1):
            out += [(f"grad.{step}.G.{k}", p.grad.clone()) for k, p in g.named_parameters()]
        opt_g.step()
        d_real = torch.sigmoid(real_logits).mean()
        d_fake = torch.sigmoid(fake_logits).mean()
        out.append((f"loss.{step}", torch.stack([err_d, err_g, d_real, d_fake]).detach()))
        if step + 1 in (1, 2, 10):
            out += named_state(g, f"state.{step + 1}.G") + named_state(d, f"state.{step + 1}.D")
    # Which inputs these outputs belong to: a fixture made from other
    # weights, batches or noise must not be compared with ours.
    inputs_sha256 = hashlib.sha256(open(f"{directory}/inputs.f32", "rb").read()).hexdigest()
    meta = dict(meta, backend=f"torch {torch.__version__} cpu", inputs_sha256=inputs_sha256)
    write_tape(directory, "torch", meta, out)
    print(f"wrote {directory}/torch.json and torch.f32 ({len(out)} tensors)")


if __name__ == "__main__":
    main(sys.argv[1])
