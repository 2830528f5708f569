import Foundation
import QuantLabCore
import QuantLabEngine
import QuantLabModels
import QuantLabQuant

/// The engine's FP32 graph against its INT8 plan on the full-size detector (YOLOv6-N
/// proportions, 160 px, RepVGG blocks in deploy form), at batch 1 and 32, in one run: the
/// ratio issue #12 sets a target for (INT8 >= 2.5x FP32). The weights are a seeded random
/// initialisation and calibration uses random images: speed does not depend on what the
/// weights are, and this needs no trained model. When the project's Python has onnxruntime
/// (`make venv`), the same two graphs are exported to ONNX (FP32, and Q/DQ) and timed there
/// too, same threads, same input: the peer issue #12 names (target: INT8 >= 1.2x onnxruntime's).
public struct EngineBenchmark {
    public var batches = [1, 32]
    public var quick = false
    public var log: (String) -> Void = { print($0) }

    public init() {}

    /// One line per batch size: img/s of each, and INT8 / FP32.
    public func run() throws -> [String] {
        var rng = SeededGenerator(seed: 0)
        let model = YOLOv6(.nano(block: .repvgg, numClasses: 10, inputSize: 160), rng: &rng)
        model.train()
        _ = withNoGrad { model(Tensor.uniform([4, 3, 160, 160], low: 0, high: 1, rng: &rng)) } // BN statistics
        model.eval()
        model.convertToDeployForm()
        // YOLOv6 starts its predictors at zero, which makes both outputs constant and any
        // comparison of outputs vacuous; random predictors change no timing
        for (name, p) in model.namedParameters() where name.hasPrefix("detect.cls_preds") || name.hasPrefix("detect.reg_preds") {
            try p.copyValues(from: Tensor.uniform(p.shape, low: -0.3, high: 0.3, rng: &rng))
        }
        log("engine: YOLOv6-N-like RepVGG detector, 160 px, deploy form; \(Kernels.cpuName); \(Kernels.summary)")
        let peak = try Kernels.peakRates() // what INT8 can gain over FP32 per multiply here
        if let peak { log("  " + peak.summary) }
        let peer = OnnxRuntimePeer.locate().flatMap { $0.isAvailable ? $0 : nil }
        if peer == nil { log("  onnxruntime: not available (run `make venv` from the repository root); ours only") }
        var summary: [String] = []
        for b in batches {
            let fp32 = try Int8Plan(try Graph.trace(model, batch: b))
            // the same graph on the model's own convs only (the default times Winograd against them)
            let fp32Conv2d = try Int8Plan(fp32.graph)
            fp32Conv2d.floatConvRoute = .conv2d
            let sim = try QuantizationSimulator(model)
            sim.calibrate(on: [Tensor.uniform([8, 3, 160, 160], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
            try sim.applyCalibration(.max)
            let int8 = try Int8Plan(try Graph.trace(model, batch: b))
            sim.remove()
            let x = Tensor.uniform([b, 3, 160, 160], low: 0, high: 1, rng: &rng)
            // This VM's speed drifts 20-40% within a minute, and onnxruntime runs in its own
            // process: so the timings come in rounds, ours (the two plans interleaved run by
            // run) then onnxruntime's, and every ratio is taken within a round, from timings
            // seconds apart; reported: the median over rounds and the range.
            let rounds = quick ? 1 : 5, runs = quick ? 5 : (b == 1 ? 150 : 8)
            var tf: [Double] = [], tq: [Double] = [], tc: [Double] = []
            var peerRounds: [(fp32: OnnxRuntimePeer.Result, qdq: OnnxRuntimePeer.Result, own: OnnxRuntimePeer.Result)] = []
            for _ in 0..<rounds {
                let speeds = try timeInterleaved([fp32, int8, fp32Conv2d], input: x, runs: runs)
                tf.append(speeds[0].medianSeconds)
                tq.append(speeds[1].medianSeconds)
                tc.append(speeds[2].medianSeconds)
                if let peer, !quick || b == 1 {
                    peerRounds.append((try peer.run(graph: fp32.graph, input: x, runs: runs), try peer.run(graph: int8.graph, input: x, runs: runs),
                                       try peer.run(graph: fp32.graph, input: x, runs: runs, quantizeFirst: true)))
                }
            }
            func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
            func ratios(_ v: [Double]) -> String {
                v.count == 1 ? String(format: "%.2fx", v[0]) : String(format: "%.2fx (rounds %.2f-%.2f)", median(v), v.min()!, v.max()!)
            }
            let line = String(format: "batch %d: FP32 graph %.1f img/s, INT8 plan %.1f img/s (%d integer convs, %d Reformat steps): INT8 %@ FP32",
                              b, Double(b) / median(tf), Double(b) / median(tq), int8.int8ConvCount, int8.reformatCount,
                              ratios(zip(tf, tq).map { $0 / $1 }))
            log("  " + line)
            summary.append("engine " + line)
            let use = fp32.winogradUse
            let winogradLine = String(format: "batch %d: FP32 graph with Winograd where it timed faster (%d of %d 3x3 stride-1 convs) %@ the model's convs alone (%.1f img/s)",
                                      b, use.running, use.candidates, ratios(zip(tc, tf).map { $0 / $1 }), Double(b) / median(tc))
            log("  " + winogradLine)
            summary.append("engine " + winogradLine)
            if let peer = peerRounds.first {
                let agree = zip(try int8.run([x]), peer.qdq.outputs).map { relativeMaxDifference($0, $1) }.max() ?? .infinity
                let of = median(peerRounds.map(\.fp32.medianSeconds)), own = median(peerRounds.map(\.own.medianSeconds))
                let oq = median(peerRounds.map(\.qdq.medianSeconds))
                let peerLine = String(format: "batch %d: onnxruntime %@ FP32 %.1f img/s; INT8 quantized its own way %.1f img/s (%d QLinearConv); our Q/DQ file %.1f img/s (%d QLinearConv). Ours / onnxruntime: FP32 %@ (the model's convs alone %@), INT8 %@ (vs its own INT8); our INT8 plan and onnxruntime on our Q/DQ file differ by %.1e of the outputs' scale",
                                      b, peer.qdq.version, Double(b) / of, Double(b) / own, peer.own.optimizedOps["QLinearConv"] ?? 0,
                                      Double(b) / oq, peer.qdq.optimizedOps["QLinearConv"] ?? 0,
                                      ratios(zip(peerRounds, tf).map { $0.fp32.medianSeconds / $1 }),
                                      ratios(zip(peerRounds, tc).map { $0.fp32.medianSeconds / $1 }),
                                      ratios(zip(peerRounds, tq).map { $0.own.medianSeconds / $1 }), agree)
                log("  " + peerLine)
                summary.append("engine " + peerLine)
            }
            do { // where the time goes (cheap: three runs each), also with --quick
                int8.profile = true
                for _ in 0..<(b == 1 ? 30 : 3) { _ = try int8.run([x]) }
                log(int8.profileReport(top: 12).split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
                if let peer, !peerRounds.isEmpty { // and against onnxruntime's own INT8, conv by conv
                    let profiled = try peer.run(graph: fp32.graph, input: x, runs: 1, quantizeFirst: true, profileRuns: b == 1 ? 30 : 3)
                    let report = LayerComparison(plan: int8, peer: profiled.layerSeconds)
                        .report(peerName: "onnxruntime INT8", top: quick ? 4 : 10, unprofiled: (median(tq), median(peerRounds.map(\.own.medianSeconds))))
                    log("    INT8 plan " + report.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n").dropFirst(4))
                }
                fp32.profile = true
                for _ in 0..<(b == 1 ? 30 : 3) { _ = try fp32.run([x]) }
                log("    FP32 graph, " + fp32.profileReport(top: 40).split(separator: "\n").map { "    " + $0 }.joined(separator: "\n").dropFirst(4))
                if let peer, !peerRounds.isEmpty { // where the FP32 gap to onnxruntime comes from
                    let profiled = try peer.run(graph: fp32.graph, input: x, runs: 1, profileRuns: b == 1 ? 30 : 3)
                    let comparison = LayerComparison(plan: fp32, peer: profiled.layerSeconds)
                    let report = comparison.report(peerName: "onnxruntime", top: quick ? 4 : 10,
                                                   unprofiled: (median(tf), median(peerRounds.map(\.fp32.medianSeconds))))
                    log("    FP32 graph " + report.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n").dropFirst(4))
                }
                if let peak {
                    for (name, plan) in [("INT8 plan", int8), ("FP32 graph", fp32)] {
                        if let line = plan.convRatesReport(against: peak) { log("    \(name): \(line)") }
                    }
                }
            }
            if CUDA.shared.isReady { // the same two plans on the GPU (issue #21)
                let (gq, gf) = (try CUDAPlan(int8), try CUDAPlan(fp32))
                let agree = zip(try gq.run([x]), try int8.run([x])).map { relativeMaxDifference($0, $1) }.max() ?? .infinity
                let runs = quick ? 5 : (b == 1 ? 200 : 20)
                var gpuQ: [Double] = [], gpuF: [Double] = []
                for _ in 0..<(quick ? 1 : 3) { // interleaved rounds, as on the CPU
                    gpuQ.append(try gq.medianLatency([x], runs: runs))
                    gpuF.append(try gf.medianLatency([x], runs: runs))
                }
                let line = String(format: "batch %d: on the GPU (%@): INT8 plan %.1f img/s, FP32 graph %.1f img/s: INT8 %@ FP32 there, GPU INT8 %.2fx the CPU INT8 plan; input copied in and outputs out per run; INT8 plan: %@; its outputs differ from the CPU plan's by %.1e of their scale",
                                  b, CUDA.shared.notice, Double(b) / median(gpuQ), Double(b) / median(gpuF), ratios(zip(gpuF, gpuQ).map { $0 / $1 }),
                                  median(tq) / median(gpuQ), gq.summary, agree)
                log("  " + line)
                summary.append("engine " + line)
            }
        }
        return summary
    }
}
