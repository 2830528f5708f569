#!/usr/bin/env python3
"""PyTorch side of `qlab bench --torch` (issue #18): our detector, rebuilt in PyTorch.

`qlab bench --torch` writes a folder with
  arch.json            the architecture as our code resolved it (block kind, widths, repeats,
                       classes, input size), our state-dict names and shapes, the labels of the
                       batch, the optimiser and loss settings, threads, batch, steps
  weights.safetensors  our initial train-form weights and BN buffers
  deploy.safetensors   the same model in deploy form (Rep blocks fused, BN folded)
  reference.safetensors  the batch's images, our train-mode outputs, loss and gradients, and
                       our deploy-form (eval) outputs
and runs this script with the folder. The script builds the same network in PyTorch from
arch.json (module names are YOLOv6's, so the state dicts must match name for name and shape
for shape), loads our weights, checks that its outputs, loss and gradients equal ours, warms
up, and prints one JSON line (the checks, its profiler's view of one step). Then it times, on
request from stdin, K training steps (forward, loss, backward, SGD update) or K deploy-form
inferences on the same batch with the same thread count, so that the caller can alternate
its own steps with PyTorch's (the VM's speed drifts by tens of percent within a minute).

The loss is a port of ours (Sources/QuantLabModels/DetectionLoss.swift): TOOD's task-aligned
assigner (top 13 candidates inside the box by score * IoU^6, conflicts to the highest IoU,
soft targets t / max t * max IoU), varifocal BCE and 2.5 x GIoU, normalised by the targets' sum.
"""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


# ---------------------------------------------------------------------------------------------
# The network, named as meituan/YOLOv6 (and as our Sources/QuantLabModels/YOLOv6.swift).
# ---------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride, padding):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class Reparam(nn.Module):
    """Deploy form of every Rep block: one 3x3 conv with bias, then ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)

    def forward(self, x):
        return F.relu(self.rbr_reparam(x))


class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.rbr_dense = ConvBN(cin, cout, 3, stride, 1)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride, 0)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return F.relu(y)


class QARepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.rbr_dense = ConvBN(cin, cout, 3, stride, 1)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.identity = cin == cout and stride == 1

    def forward(self, x):
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.identity:
            y = y + x
        return F.relu(self.bn(y))


class RealVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


BLOCKS = {"repvgg": RepVGGBlock, "qarepvgg": QARepVGGBlock, "repopt": RealVGGBlock}


def rep_block(kind, deploy, cin, cout, stride=1):
    return Reparam(cin, cout, stride) if deploy else BLOCKS[kind](cin, cout, stride)


class ConvBNAct(nn.Module):
    """Train form: conv (no bias) + bn; deploy form: conv with the BN folded in as its bias."""

    def __init__(self, cin, cout, k, stride=1, act="relu", deploy=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=deploy)
        self.bn = None if deploy else nn.BatchNorm2d(cout)
        self.act = {"relu": F.relu, "silu": F.silu, "none": lambda t: t}[act]

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return self.act(y)


class RepStage(nn.Module):
    def __init__(self, kind, deploy, cin, cout, n):
        super().__init__()
        self.conv1 = rep_block(kind, deploy, cin, cout)
        self.block = nn.Sequential(*[rep_block(kind, deploy, cout, cout) for _ in range(n - 1)]) if n > 1 else None

    def forward(self, x):
        y = self.conv1(x)
        return self.block(y) if self.block is not None else y


class SimSPPF(nn.Module):
    def __init__(self, cin, cout, deploy):
        super().__init__()
        self.cv1 = ConvBNAct(cin, cin // 2, 1, deploy=deploy)
        self.cv2 = ConvBNAct(cin // 2 * 4, cout, 1, deploy=deploy)

    def forward(self, x):
        a = self.cv1(x)
        b = F.max_pool2d(a, 5, 1, 2)
        c = F.max_pool2d(b, 5, 1, 2)
        d = F.max_pool2d(c, 5, 1, 2)
        return self.cv2(torch.cat([a, b, c, d], 1))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(c, c, 2, 2, bias=True)

    def forward(self, x):
        return self.upsample_transpose(x)


class EfficientRep(nn.Module):
    def __init__(self, kind, deploy, ch, n):
        super().__init__()
        self.stem = rep_block(kind, deploy, 3, ch[0], 2)
        for i in range(1, 5):
            layers = [rep_block(kind, deploy, ch[i - 1], ch[i], 2), RepStage(kind, deploy, ch[i], ch[i], n[i])]
            if i == 4:
                layers.append(SimSPPF(ch[4], ch[4], deploy))
            setattr(self, f"ERBlock_{i + 1}", nn.Sequential(*layers))

    def forward(self, x):
        x1 = self.ERBlock_2(self.stem(x))
        c3 = self.ERBlock_3(x1)
        c4 = self.ERBlock_4(c3)
        c5 = self.ERBlock_5(c4)
        return c3, c4, c5


class RepPANNeck(nn.Module):
    def __init__(self, kind, deploy, bc, nc, n):
        super().__init__()
        self.reduce_layer0 = ConvBNAct(bc[4], nc[0], 1, deploy=deploy)
        self.upsample0 = Upsample(nc[0])
        self.Rep_p4 = RepStage(kind, deploy, bc[3] + nc[0], nc[0], n[0])
        self.reduce_layer1 = ConvBNAct(nc[0], nc[1], 1, deploy=deploy)
        self.upsample1 = Upsample(nc[1])
        self.Rep_p3 = RepStage(kind, deploy, bc[2] + nc[1], nc[1], n[1])
        self.downsample2 = ConvBNAct(nc[1], nc[2], 3, 2, deploy=deploy)
        self.Rep_n3 = RepStage(kind, deploy, nc[1] + nc[2], nc[3], n[2])
        self.downsample1 = ConvBNAct(nc[3], nc[4], 3, 2, deploy=deploy)
        self.Rep_n4 = RepStage(kind, deploy, nc[0] + nc[4], nc[5], n[3])

    def forward(self, feats):
        x2, x1, x0 = feats
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(torch.cat([self.upsample0(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(torch.cat([self.upsample1(fpn_out1), x2], 1))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return pan_out2, pan_out1, pan_out0


class EffiDeHead(nn.Module):
    def __init__(self, channels, num_classes, deploy):
        super().__init__()
        self.num_classes = num_classes
        self.stems = nn.ModuleList([ConvBNAct(c, c, 1, act="silu", deploy=deploy) for c in channels])
        self.cls_convs = nn.ModuleList([ConvBNAct(c, c, 3, act="silu", deploy=deploy) for c in channels])
        self.reg_convs = nn.ModuleList([ConvBNAct(c, c, 3, act="silu", deploy=deploy) for c in channels])
        self.cls_preds = nn.ModuleList([nn.Conv2d(c, num_classes, 1) for c in channels])
        self.reg_preds = nn.ModuleList([nn.Conv2d(c, 4, 1) for c in channels])

    def forward(self, feats):
        cls, reg = [], []
        for i, f in enumerate(feats):
            x = self.stems[i](f)
            c = self.cls_preds[i](self.cls_convs[i](x))
            r = self.reg_preds[i](self.reg_convs[i](x))
            b, _, h, w = f.shape
            cls.append(c.reshape(b, self.num_classes, h * w).permute(0, 2, 1))
            reg.append(r.reshape(b, 4, h * w).permute(0, 2, 1))
        return torch.cat(cls, 1), torch.cat(reg, 1)


class YOLOv6(nn.Module):
    def __init__(self, arch, deploy=False):
        super().__init__()
        kind = arch["block"]
        self.backbone = EfficientRep(kind, deploy, arch["backboneWidths"], arch["backboneDepths"])
        self.neck = RepPANNeck(kind, deploy, arch["backboneWidths"], arch["neckWidths"], arch["neckDepths"])
        nc = arch["neckWidths"]
        self.detect = EffiDeHead([nc[1], nc[3], nc[5]], arch["numClasses"], deploy)

    def forward(self, x):
        return self.detect(self.neck(self.backbone(x)))


# ---------------------------------------------------------------------------------------------
# The loss: a port of DetectionLoss.swift, vectorised over gts and anchors.
# ---------------------------------------------------------------------------------------------
def anchor_grid(size, strides=(8, 16, 32)):
    pts, st = [], []
    for s in strides:
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
        pts.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], 1))
        st.append(torch.full((n * n,), float(s), dtype=torch.float64))
    return torch.cat(pts), torch.cat(st)


def box_iou(a, b):
    """IoU of every box in a [P, 4] with every box in b [Q, 4] (x1, y1, x2, y2), as [P, Q]."""
    iw = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def assign(probs, boxes, points, gt_boxes, gt_classes, top_k, alpha, beta):
    """One image. probs [A, C], boxes [A, 4] (float64, detached); gts [G, 4], [G].
    Returns per anchor the owning gt (-1 none) and the soft target."""
    a = probs.shape[0]
    owner = torch.full((a,), -1, dtype=torch.long)
    target = torch.zeros(a, dtype=torch.float64)
    g = gt_boxes.shape[0]
    if g == 0:
        return owner, target
    eps = 1e-9
    px, py = points[:, 0][None, :], points[:, 1][None, :]
    inside = (px - gt_boxes[:, 0:1] > eps) & (py - gt_boxes[:, 1:2] > eps) & (gt_boxes[:, 2:3] - px > eps) & (gt_boxes[:, 3:4] - py > eps)
    ious = box_iou(gt_boxes, boxes).clamp(min=0) * inside
    scores = probs[:, gt_classes].T  # [G, A]
    align = scores.pow(alpha) * ious.pow(beta) * inside
    key = torch.where(inside, align, torch.full_like(align, -1.0))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :top_k]
    chosen = torch.zeros_like(inside)
    chosen.scatter_(1, order, True)
    chosen &= inside
    masked = torch.where(chosen, ious, torch.full_like(ious, -math.inf))
    best = masked.argmax(0)  # first maximal gt, as the Swift loop's strict >
    claimed = chosen.any(0)
    owner = torch.where(claimed, best, owner)
    own = torch.zeros_like(chosen)
    own[best[claimed], torch.nonzero(claimed).flatten()] = True
    max_align = torch.where(own, align, torch.zeros_like(align)).amax(1)
    max_iou = torch.where(own, ious, torch.zeros_like(ious)).amax(1)
    idx = torch.nonzero(claimed).flatten()
    gi = owner[idx]
    target[idx] = align[gi, idx] * max_iou[gi] / (max_align[gi] + 1e-9)
    return owner, target


def giou(p, g):
    iw = (torch.minimum(p[:, 2], g[:, 2]) - torch.maximum(p[:, 0], g[:, 0])).relu()
    ih = (torch.minimum(p[:, 3], g[:, 3]) - torch.maximum(p[:, 1], g[:, 1])).relu()
    inter = iw * ih
    area_p = (p[:, 2] - p[:, 0]).relu() * (p[:, 3] - p[:, 1]).relu()
    area_g = (g[:, 2] - g[:, 0]).relu() * (g[:, 3] - g[:, 1]).relu()
    union = area_p + area_g - inter + 1e-7
    enclose = (torch.maximum(p[:, 2], g[:, 2]) - torch.minimum(p[:, 0], g[:, 0])) * (torch.maximum(p[:, 3], g[:, 3]) - torch.minimum(p[:, 1], g[:, 1])) + 1e-7
    return inter / union - (enclose - union) / enclose


class DetectionLoss:
    def __init__(self, cfg, size, labels):
        self.cfg = cfg
        self.points, self.strides = anchor_grid(size)
        self.labels = [(torch.tensor([l["box"] for l in ls], dtype=torch.float64).reshape(-1, 4),
                        torch.tensor([l["class"] for l in ls], dtype=torch.long)) for ls in labels]

    def assignments(self, cls_logits, distances, probs_all=None):
        """Per image (owner [A], target [A]) from the detached outputs (`probs_all`: their
        sigmoid in float64, when the caller has it)."""
        with torch.no_grad():
            if probs_all is None:
                probs_all = torch.sigmoid(cls_logits).double()
            d = distances.double()
            s = self.strides[None, :, None]
            pts = self.points[None]
            boxes_all = torch.cat([pts - d[..., :2] * s, pts + d[..., 2:] * s], 2)
            c = self.cfg
            return [assign(probs_all[i], boxes_all[i], self.points, *self.labels[i], c["topK"], c["alpha"], c["beta"])
                    for i in range(cls_logits.shape[0])]

    def __call__(self, cls_logits, distances, fixed=None):
        """The loss; `fixed`: use these assignments (ours) instead of computing them."""
        c = self.cfg
        b, a, nc = cls_logits.shape
        targets = torch.zeros(b, a, nc)
        weights = torch.zeros(b, a, nc)
        pos_rows, pos_gt, pos_w = [], [], []
        score_sum = 0.0
        with torch.no_grad():
            probs_all = torch.sigmoid(cls_logits).double()
        assigned = fixed if fixed is not None else self.assignments(cls_logits, distances, probs_all)
        with torch.no_grad():
            for i in range(b):
                gt_boxes, gt_classes = self.labels[i]
                owner, target = assigned[i]
                w = c["vflAlpha"] * probs_all[i].pow(c["vflGamma"])
                pos = torch.nonzero(owner >= 0).flatten()
                if len(pos):
                    cls = gt_classes[owner[pos]]
                    w[pos, cls] = target[pos]
                    targets[i, pos, cls] = target[pos].float()
                    pos_rows.append(i * a + pos)
                    pos_gt.append(gt_boxes[owner[pos]])
                    pos_w.append(target[pos])
                    score_sum += float(target[pos].sum())
                weights[i] = w.float()
        norm = max(score_sum, 1.0)
        bce = F.binary_cross_entropy_with_logits(cls_logits, targets, reduction="none")
        cls_loss = (bce * weights).sum() / norm
        box_loss = cls_logits.new_zeros(())
        if pos_rows:
            rows = torch.cat(pos_rows)
            gt = torch.cat(pos_gt).float()
            w = torch.cat(pos_w).float()
            dd = distances.reshape(-1, 4)[rows]
            anchor = self.points[rows % a].float()
            stride = self.strides[rows % a].float()[:, None]
            pred = torch.cat([anchor - dd[:, :2] * stride, anchor + dd[:, 2:] * stride], 1)
            box_loss = ((1 - giou(pred, gt)) * w).sum() / norm
        return cls_loss * c["classWeight"] + box_loss * c["boxWeight"]


# ---------------------------------------------------------------------------------------------
def rel(a, b):
    """|a - b| / |b| in the L2 norm."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(folder):
    arch = json.load(open(f"{folder}/arch.json"))
    threads = arch["threads"]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ref = load_file(f"{folder}/reference.safetensors")
    images = ref["images"]
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "mkldnn": torch.backends.mkldnn.is_available(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    model = YOLOv6(arch)
    ours = {name: shape for name, shape in arch["stateDict"]}
    theirs = {k: list(v.shape) for k, v in model.state_dict().items()}
    if ours != theirs:
        only_ours = sorted(set(ours) - set(theirs))[:5]
        only_theirs = sorted(set(theirs) - set(ours))[:5]
        shapes = [k for k in set(ours) & set(theirs) if ours[k] != theirs[k]][:5]
        sys.exit(f"state dicts differ: only ours {only_ours}, only PyTorch's {only_theirs}, shapes differ {shapes}")
    report["parameters"] = sum(p.numel() for p in model.parameters())
    missing, unexpected = model.load_state_dict(load_file(f"{folder}/weights.safetensors"), strict=True)
    model.train()

    loss_fn = DetectionLoss(arch["loss"], images.shape[-1], arch["labels"])
    # 1. same function: outputs, loss and gradients against ours on the same batch, each also
    # against PyTorch in float64 (the exact answer, to float32's precision): ours must be as
    # close to it as PyTorch's own float32 is, up to a factor (summation orders differ)
    # the assigner is a discontinuous function of the outputs: where two candidates nearly tie,
    # float32 and float64 (or ours and PyTorch's) can pick different anchors and move a gradient
    # by far more than rounding. So the gradient check uses our assignment on both sides, and
    # the port of the assigner is checked on its own, on the same outputs.
    ours_assigned = [(ref["assign.gt"][i].long(), ref["assign.target"][i].double()) for i in range(images.shape[0])]

    def forward_backward(m, x):
        c, d = m(x)
        l = loss_fn(c, d, fixed=ours_assigned)
        l.backward()
        return c.detach(), d.detach(), l.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    c32, d32, l32, g32 = forward_backward(model, images)
    exact = YOLOv6(arch).double()
    exact.load_state_dict(load_file(f"{folder}/weights.safetensors"), strict=True)
    exact.train()
    c64, d64, l64, g64 = forward_backward(exact, images.double())
    del exact
    checks = {"classLogits": (ref["classLogits"], c32, c64), "distances": (ref["distances"], d32, d64),
              "loss": (ref["loss"], l32, l64)}
    for n in g64:
        if g64[n].norm() > 0:
            checks["grad." + n] = (ref["grad." + n], g32[n], g64[n])
    rows = {}
    for k, (ours_t, t32, t64) in checks.items():
        rows[k] = {"ours": rel(ours_t, t64), "torch": rel(t32, t64), "oursVsTorch": rel(ours_t, t32)}
        if not all(math.isfinite(v) for v in rows[k].values()):
            sys.exit(f"check {k}: a non-finite difference {rows[k]}")
    grads = [k for k in rows if k.startswith("grad.")]
    # per parameter: our error over max(10 x PyTorch float32's error, 1e-4); the check needs <= 1
    def bound(k):
        return rows[k]["ours"] / max(10 * rows[k]["torch"], 1e-4)
    worst = max(grads, key=bound)
    report["check"] = {"classLogits": rows["classLogits"]["ours"], "distances": rows["distances"]["ours"],
                       "loss": rows["loss"]["ours"],
                       "gradients": max(rows[k]["ours"] for k in grads),
                       "torchGradients": max(rows[k]["torch"] for k in grads),
                       "gradientBound": bound(worst),
                       "worstGradient": worst[len("grad."):],
                       "oursVsTorchGradients": max(rows[k]["oursVsTorch"] for k in grads)}
    report["checkRows"] = rows
    theirs_assigned = loss_fn.assignments(ref["classLogits"], ref["distances"])
    owners = sum(int((o != oo).sum()) for (o, _), (oo, _) in zip(theirs_assigned, ours_assigned))
    targets = max(float((t - tt).abs().max()) for (_, t), (_, tt) in zip(theirs_assigned, ours_assigned))
    report["check"]["assignerOwnerMismatches"] = float(owners)
    report["check"]["assignerTarget"] = targets
    report["check"]["positives"] = float(sum(int((o >= 0).sum()) for o, _ in ours_assigned))
    # restore the initial weights and buffers (the check's step ran BN in train mode)
    model.load_state_dict(load_file(f"{folder}/weights.safetensors"), strict=True)
    model.zero_grad(set_to_none=True)

    # 2. training step, as ours: SGD with Nesterov momentum, decay on conv weights only
    opt = arch["optimizer"]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    sgd = torch.optim.SGD([{"params": decay, "weight_decay": opt["weightDecay"]}, {"params": plain, "weight_decay": 0.0}],
                          lr=opt["learningRate"], momentum=opt["momentum"], nesterov=opt["nesterov"])

    last = [0.0]

    def step():
        c, d = model(images)
        l = loss_fn(c, d)
        sgd.zero_grad(set_to_none=True)
        l.backward()
        sgd.step()
        last[0] = l.detach()

    batch = images.shape[0]
    timed(step, arch["warmup"], 0)
    # where PyTorch's step goes (its own profiler), one step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    rows = []
    for e in prof.key_averages():
        rows.append({"op": e.key, "selfSeconds": e.self_cpu_time_total / 1e6, "calls": e.count})
    rows.sort(key=lambda r: -r["selfSeconds"])
    report["trainProfile"] = rows[:25]
    # loss alone (assigner included), for the breakdown
    with torch.no_grad():
        c, d = model(images)
    report["lossSeconds"] = timed(lambda: loss_fn(c, d), 1, 5)

    # 3. deploy-form inference
    deploy = YOLOv6(arch, deploy=True)
    deploy.load_state_dict(load_file(f"{folder}/deploy.safetensors"), strict=True)
    deploy.eval()
    with torch.no_grad():
        dc, dd = deploy(images)
        report["check"]["deployClassLogits"] = rel(dc, ref["deploy.classLogits"])
        report["check"]["deployDistances"] = rel(dd, ref["deploy.distances"])
        timed(lambda: deploy(images), arch["warmup"], 0)
    report["batch"] = batch
    bad = list(non_finite(report))
    if bad:
        sys.exit(f"non-finite values in the report: {bad[:5]}")
    print(json.dumps(report, allow_nan=False), flush=True)

    # 4. timing on request, so the caller can interleave our steps with its own: each line
    # "train K" or "infer K" is answered with {"seconds": [...]}; "quit" (or end of input) ends
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        k = int(words[1])
        if words[0] == "train":
            t = timed(step, 0, k)
            if not math.isfinite(float(last[0])):
                sys.exit(f"PyTorch's training loss is {float(last[0])}: the timed steps diverged")
        else:
            with torch.no_grad():
                t = timed(lambda: deploy(images), 0, k)
        print(json.dumps({"seconds": t}), flush=True)


def non_finite(obj, path=""):
    """Paths of NaN or infinite numbers in a JSON-like object."""
    if isinstance(obj, float) and not math.isfinite(obj):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from non_finite(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from non_finite(v, f"{path}[{i}]")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torch_train_bench.py FOLDER (written by qlab bench --torch)")
    main(sys.argv[1])
