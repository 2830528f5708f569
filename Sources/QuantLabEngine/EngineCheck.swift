import Foundation
import QuantLabCore
import QuantLabQuant

/// The same PTQ (one calibration, one method) measured twice: with fake quantization in the
/// FP32 model (the simulator, what PTQ results are usually reported with) and on the INT8
/// engine's integer kernels. Issue #12 asks for these to agree within 0.001.
public struct EngineCheck: Codable, Equatable, Sendable {
    public var simulator: Double
    public var engine: Double
    public var integerConvs: Int
    public var reformatSteps: Int
    public var batch: Int

    enum CodingKeys: String, CodingKey {
        case simulator, engine, batch
        case integerConvs = "integer_convs", reformatSteps = "reformat_steps"
    }

    public var difference: Double { engine - simulator }
}

/// Calibrates `subject` (a deploy-form model) with `method` on `calibration`, measures the
/// metric with the simulator, then traces the Q/DQ graph at `batch`, compiles the INT8 plan and
/// measures the metric on the engine; removes the quantizers.
public func checkEngine(_ subject: PTQSubject, method: CalibrationMethod, calibration: CalibrationPlan, batch: Int = 32) throws -> EngineCheck {
    let sim = try QuantizationSimulator(subject.module)
    defer { sim.remove() }
    sim.calibrate(on: try subject.calibrationImages(calibration), forward: subject.forward)
    try sim.applyCalibration(method)
    let simulated = try subject.evaluate("simulator \(subject.label)")
    let graph = try Graph.trace(subject.module, example: Tensor(zeros: [batch] + subject.inputShape), subject.outputs)
    let plan = try Int8Plan(graph)
    let engine = try subject.score({ try plan.runBatch($0) }, "INT8 engine \(subject.label)")
    return EngineCheck(simulator: simulated, engine: engine, integerConvs: plan.int8ConvCount,
                       reformatSteps: plan.reformatCount, batch: batch)
}
