import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// PaddleSlim's auto-compression (ACT) as Baidu ran it on RT-DETR (SOURCES.md B2, QAT.md):
// quantization-aware training with no labels, the FP32 model as its own teacher through a
// soft-label loss; activations quantized with moving_average_abs_max (r = 0.9), weights per
// output channel with their current abs max; conv2d and matmul_v2 (linear layers and the
// attention products) quantized; SGD with weight decay 4e-5 and a cosine learning rate.

/// PaddleSlim's `soft_label` distillation: the mean over rows of the cross-entropy between
/// softmax(teacher / T) and softmax(student / T), over the last dimension:
///   L = -1/R sum_r sum_c softmax(t_r / T)_c log softmax(s_r / T)_c.
/// No gradient reaches the teacher.
public func softLabelLoss(student: Tensor, teacher: Tensor, temperature: Float = 1) -> Tensor {
    require(student.shape == teacher.shape && student.rank >= 1, "soft_label: student \(student.shape) vs teacher \(teacher.shape)")
    require(temperature > 0, "soft_label: temperature must be positive, got \(temperature)")
    let classes = student.shape.last!, rows = student.count / max(classes, 1)
    let target = withNoGrad { teacher.detached().reshaped([rows, classes]).scaled(by: 1 / temperature).softmax() }
    let logP = student.reshaped([rows, classes]).scaled(by: 1 / temperature).logSoftmax()
    return (logP * target).sum().scaled(by: -1 / Float(rows))
}

public struct ACTConfig: Codable, Equatable, Sendable {
    /// Training iterations (PaddleSlim's train_iter; Baidu: 1000 at batch 4 per GPU).
    public var iterations = 300
    public var batchSize = 16
    /// Cosine from this to 0 (PaddleSlim: 3e-5 over 1000 iterations; see exp07 for the scaling).
    public var learningRate: Float = 1e-4
    public var momentum: Float = 0.9
    public var weightDecay: Float = 4e-5
    public var temperature: Float = 1
    /// Weight of the L2 between student and teacher boxes (our addition: soft_label covers the
    /// class logits only; a detector's boxes need a term of their own).
    public var boxWeight: Float = 5
    public var seed: UInt64 = 0
    public var workers = 2

    public init() {}
}

/// Runs ACT on `student` (deploy form, quantizers of `simulator` installed and calibrated) with
/// `teacher` (the FP32 model, same weights at the start, never updated). Returns the loss per
/// iteration. Augmentation: RT-DETR's training transform (labels are not used).
@discardableResult
public func runACT(student: RTDETR, simulator: QuantizationSimulator, teacher: RTDETR, train: DetectionDataset,
                   config: ACTConfig, log: (String) -> Void = { print($0) }) throws -> [Float] {
    let loader = DetectionLoader(dataset: train, batchSize: config.batchSize, transform: RTDETRTrainer.augmentation(inputSize: student.config.inputSize),
                                 shuffle: true, seed: config.seed, dropLast: true, workers: config.workers)
    let optimizer = SGD(student.parameterGroups(weightDecay: config.weightDecay), learningRate: config.learningRate, momentum: config.momentum)
    let schedule = WarmupCosineSchedule(base: config.learningRate, warmupSteps: 0, totalSteps: max(config.iterations, 1), finalFactor: 0)
    teacher.eval()
    // BN is folded (deploy form); train mode only turns on the decoder's detaches
    student.train()
    let activations = simulator.layers.map(\.input)
    for q in activations { q.tracksMovingAverage = true }
    defer {
        for q in activations { q.tracksMovingAverage = false }
        student.eval()
    }
    let progress = Progress(total: config.iterations, label: "ACT", unit: "step")
    var losses: [Float] = []
    var step = 0
    while step < config.iterations {
        let epoch = step / max(loader.batchCount(), 1), order = loader.order(epoch: epoch)
        for b in 0..<loader.batchCount() where step < config.iterations {
            let images = try loader.batch(b, epoch: epoch, order: order).images
            optimizer.learningRate = schedule.learningRate(at: step)
            // per-channel abs max of the weights as they are now (channel_wise_abs_max)
            for l in simulator.layers { if let w = l.weight, let t = l.weightTensor { w.calibrateWeight(t) } }
            let target = withNoGrad { teacher(images) }
            let out = student(images)
            let soft = softLabelLoss(student: out.logits, teacher: target.logits, temperature: config.temperature)
            let box = (out.boxes - target.boxes.detached())
            let loss = soft + (box * box).mean().scaled(by: config.boxWeight)
            guard loss.item().isFinite else { throw NonFiniteError("ACT step \(step + 1): the loss is \(loss.item())") }
            optimizer.zeroGrad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            progress.update(step, String(format: "loss %.5f (soft-label %.5f)", loss.item(), soft.item()))
        }
    }
    for l in simulator.layers { if let w = l.weight, let t = l.weightTensor { w.calibrateWeight(t) } }
    progress.finish()
    log(String(format: "ACT: %d iterations, loss %.5f -> %.5f", losses.count, losses.first ?? .nan, losses.last ?? .nan))
    return losses
}

/// An INT8 model file: every enabled quantized layer's weight as int8 codes (`<name>`, I8) with
/// its scales (`<name>.scale`, F32, amax / 127 per output channel; the axis in the metadata as
/// `axis:<name>`), everything else F32: how an INT8 engine stores a model, and what "4x smaller"
/// measures.
public enum Int8ModelFile {
    public static func encode(_ model: Module, simulator: QuantizationSimulator) throws -> Data {
        var quantized: [ObjectIdentifier: TensorQuantizer] = [:]
        for l in simulator.layers where l.isEnabled {
            if let w = l.weightTensor, let q = l.weight { quantized[ObjectIdentifier(w)] = q }
        }
        var payloads: [(String, SafeTensors.Payload)] = []
        var metadata = ["format": "quantlab-int8"]
        for (name, t) in model.stateDict() {
            guard let q = quantized[ObjectIdentifier(t)], let amax = q.amax else { payloads.append((name, .float32(t))); continue }
            let scales = amax.map { max($0, Float.leastNormalMagnitude) / Float(q.spec.qmax) }
            let (channels, inner) = layout(t.shape, axis: q.spec.axis)
            let qmax = Float(q.spec.qmax)
            let codes = (0..<t.count).map { i in Int8(min(max((t.data[i] / scales[(i / inner) % channels]).rounded(.toNearestOrEven), -qmax), qmax)) }
            payloads.append((name, .raw(.I8, shape: t.shape, bytes: codes.withUnsafeBytes { Data($0) })))
            payloads.append(("\(name).scale", .float32(Tensor(scales, shape: [scales.count]))))
            metadata["axis:\(name)"] = q.spec.axis.map(String.init) ?? "none"
        }
        return try SafeTensors.encode(payloads, metadata: metadata)
    }

    /// The weights a file holds by name, int8 ones dequantized (code * scale).
    public static func decode(_ data: Data) throws -> [String: Tensor] {
        let file = try SafeTensorsFile(data: data)
        var out = file.tensors()
        for e in file.entries where e.dtype == .I8 {
            guard let scale = out["\(e.name).scale"], let axisText = file.metadata["axis:\(e.name)"] else {
                throw SafeTensorsError("int8 tensor \(e.name) has no \(e.name).scale or no axis:\(e.name) metadata")
            }
            let axis = axisText == "none" ? nil : Int(axisText)
            let (channels, inner) = layout(e.shape, axis: axis)
            guard channels == scale.count, axis.map({ $0 >= 0 && $0 < e.shape.count }) ?? true else {
                throw SafeTensorsError("int8 tensor \(e.name) \(e.shape): \(scale.count) scales along axis \(axisText)")
            }
            let codes = out[e.name]!
            for i in 0..<codes.count { codes.data[i] *= scale.data[(i / inner) % channels] }
            out["\(e.name).scale"] = nil
        }
        return out
    }

    /// Channels along `axis` and the elements of one channel's run (1 channel without an axis).
    static func layout(_ shape: [Int], axis: Int?) -> (channels: Int, inner: Int) {
        guard let axis else { return (1, max(shape.reduce(1, *), 1)) }
        return (shape[axis], max(shape[(axis + 1)...].reduce(1, *), 1))
    }
}
