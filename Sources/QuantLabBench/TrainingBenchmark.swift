import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

/// The detector training step that `qlab bench` times, and (with `--torch`) the same step in
/// PyTorch in the same run (issue #18).
///
/// The workload: a YOLOv6-N-like detector (width 0.25, depth 0.33, train-form Rep blocks),
/// 160 px, batch 32, random images with 4 random boxes each, our loss (task-aligned assigner,
/// varifocal + GIoU), SGD with Nesterov momentum and weight decay on conv weights.
///
/// The PyTorch side is `scripts/torch_train_bench.py`, run in the Python given (`make
/// bench-torch` makes `.venv-torch` with PyTorch). It builds the network from the description
/// written here (block kind, resolved widths and repeats, classes) and must reproduce our state
/// dict name for name and shape for shape; it then loads our initial weights and checks its
/// outputs, loss and every gradient against ours on the same batch before anything is timed,
/// so both sides time the same function.
public struct TrainingBenchmark {
    public var block: BlockKind = .repvgg
    public var batch = 32
    public var inputSize = 160
    public var warmup = 2
    /// Timed steps per side, in `rounds` alternating blocks.
    public var steps = 24
    public var rounds = 4
    public var seed: UInt64 = 3
    public var log: (String) -> Void = { print($0) }

    public init() {}

    /// The model, the batch and its labels (seeded).
    public struct Workload {
        public let model: YOLOv6
        public let images: Tensor
        public let labels: [[ObjectLabel]]
    }

    public func workload() -> Workload {
        var rng = SeededGenerator(seed: seed)
        let model = YOLOv6(.nano(block: block, numClasses: 10, inputSize: inputSize), rng: &rng)
        // YOLOv6 starts its predictors at zero weights, which would make every output a
        // constant and every gradient below the head zero at the first step; small random
        // predictors make the first step, and so the check against PyTorch, exercise it all
        for p in model.detect.clsPreds.items + model.detect.regPreds.items {
            let w = (p as! Conv2d).weight
            let values = Tensor.uniform(w.shape, low: -0.01, high: 0.01, rng: &rng)
            withExtendedLifetime(values) { w.data.update(from: values.data, count: w.count) }
        }
        let images = Tensor.uniform([batch, 3, inputSize, inputSize], low: 0, high: 1, rng: &rng)
        let span = Double(inputSize)
        let labels: [[ObjectLabel]] = (0..<batch).map { _ in
            (0..<4).map { _ in
                let cx = span / 8 + Double(rng.nextFloat()) * span * 3 / 4, cy = span / 8 + Double(rng.nextFloat()) * span * 3 / 4
                let w = span / 20 + Double(rng.nextFloat()) * span / 4
                return ObjectLabel(box: Box(cx: cx, cy: cy, w: w, h: w), classIndex: Int(rng.next() % 10))
            }
        }
        return Workload(model: model, images: images, labels: labels)
    }

    /// SGD as `qlab train` uses it (momentum 0.937, Nesterov, decay 5e-4 on conv weights) at
    /// its warm-up's first rate: the timed steps repeat one random batch with no warm-up, and at
    /// the full rate that diverges within ~20 steps.
    static let learningRate: Float = 0.002, momentum: Float = 0.937, weightDecay: Float = 5e-4

    /// One training step's closure on `w` (forward, loss, zero grad, backward, update); it
    /// returns the step's loss.
    public func trainingStep(_ w: Workload) -> () -> Float {
        let optimizer = SGD(w.model.parameterGroups(weightDecay: Self.weightDecay), learningRate: Self.learningRate,
                            momentum: Self.momentum, nesterov: true)
        let loss = DetectionLoss()
        return {
            let (c, d) = w.model(w.images)
            let (total, parts) = OpProfiler.scoped("loss/") { loss(w.model, classLogits: c, distances: d, labels: w.labels) }
            optimizer.zeroGrad()
            OpProfiler.mark("zero grad") // the marks and the scope cost nothing unless `profile` measures
            total.backward()
            optimizer.step()
            OpProfiler.mark("optimizer.step")
            return parts.total
        }
    }

    /// Times `steps` training steps (0: `warmup` untimed ones); throws if a loss is not finite.
    func timeTraining(_ step: () -> Float, steps: Int) throws -> [Double] {
        var last: Float = 0
        let seconds = Self.time(warmup: steps == 0 ? warmup : 0, steps: steps) { last = step() }
        guard last.isFinite else { throw PeerError("our training loss is \(last): the timed steps diverged") }
        return seconds
    }

    /// Seconds of each of `steps` calls after `warmup` untimed ones.
    public static func time(warmup: Int, steps: Int, _ body: () -> Void) -> [Double] {
        for _ in 0..<warmup { body() }
        return (0..<steps).map { _ in
            let clock = Stopwatch()
            body()
            return clock.seconds
        }
    }

    // MARK: - where our time goes

    /// Our step under `OpProfiler` (after one unprofiled step): seconds per step by key,
    /// slowest first. Keys: "forward|backward <op>", convolutions by geometry, the loss's ops
    /// under "loss/" and its assigner and target building as "loss: ...", and the steps
    /// between ("zero grad", "optimizer.step").
    public func profile(steps: Int = 3) -> [OpProfiler.Entry] {
        let step = trainingStep(workload())
        _ = step()
        let (_, entries) = OpProfiler.measure { for _ in 0..<steps { _ = step() } }
        return entries.map { OpProfiler.Entry(key: $0.key, seconds: $0.seconds / Double(steps), calls: $0.calls / steps) }
    }

    /// The profile folded into kinds of work: convolution forward / backward, batch norm,
    /// the loss (assigner, targets, its ops), the optimizer, and each other op by name.
    public static func breakdown(_ entries: [OpProfiler.Entry]) -> [(kind: String, seconds: Double)] {
        var kinds: [String: Double] = [:]
        for e in entries {
            let words = e.key.split(separator: " ", maxSplits: 1).map(String.init)
            let kind: String
            if e.key.hasPrefix("loss") || e.key.contains(" loss/") { kind = "loss (assigner, targets, its ops fwd+bwd)" }
            else if words.count == 2, words[0] == "forward" || words[0] == "backward" {
                let op = words[1].split(separator: " ").first.map(String.init) ?? words[1]
                kind = "\(words[0]) \(op)"
            } else { kind = e.key }
            kinds[kind, default: 0] += e.seconds
        }
        return kinds.map { ($0.key, $0.value) }.sorted { $0.seconds > $1.seconds }
    }

    // MARK: - against PyTorch

    public struct Side: Codable, Sendable {
        public var trainSeconds: [Double]
        public var inferenceSeconds: [Double]
    }

    /// What one run measured.
    public struct Report: Codable, Sendable {
        /// `Kernels.cpuName` (absent from reports written before it was recorded).
        public var cpu: String?
        public var isa: String
        public var threads: Int
        public var block: String
        public var batch: Int
        public var inputSize: Int
        public var parameters: Int
        /// Alternating blocks of steps, ours then PyTorch's; every sample of each side.
        public var rounds: Int
        public var ours: Side
        public var torch: Side
        public var torchVersion: String
        public var torchCPUCapability: String
        /// Relative L2 differences of PyTorch's results from ours on the same batch and weights.
        public var check: [String: Double]
        public var worstGradient: String
        /// PyTorch's profiler, one step: op, self seconds, calls (top 25).
        public var torchProfile: [ProfileRow]
        /// Ours (`profile`), seconds per step: every key, slowest first.
        public var ourProfile: [ProfileRow]
        public var torchLossSeconds: [Double]
        public var ourLossSeconds: [Double]
        public var date: String

        /// Our speed over PyTorch's: the ratio of median step times.
        public var trainRatio: Double { Report.median(torch.trainSeconds) / Report.median(ours.trainSeconds) }
        public var inferenceRatio: Double { Report.median(torch.inferenceSeconds) / Report.median(ours.inferenceSeconds) }
        public static func median(_ x: [Double]) -> Double { let s = x.sorted(); return s.isEmpty ? .nan : s[s.count / 2] }
    }

    public struct ProfileRow: Codable, Sendable {
        public var op: String
        public var selfSeconds: Double
        public var calls: Int
    }

    public struct PeerError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    /// What the check against PyTorch accepts, each a relative L2 difference. Outputs and loss:
    /// ours against PyTorch in float64 on the same weights and batch. Gradients: for every
    /// parameter, our error against float64 over max(10 x PyTorch float32's own error, 1e-4)
    /// ("gradientBound" <= 1): through ~60 layers of BN, float32 gradients of small norm (BN
    /// scales deep in the backbone) carry errors of 1e-3 and more in either implementation, so a
    /// fixed tolerance would either fail on rounding or pass a wrong gradient of a large one.
    /// Deploy-form outputs: ours against PyTorch's deploy model (float32).
    static let checkLimits: [(String, Double)] = [("classLogits", 1e-4), ("distances", 1e-4), ("loss", 1e-4), ("gradientBound", 1),
                                                  ("deployClassLogits", 1e-4), ("deployDistances", 1e-4),
                                                  ("assignerOwnerMismatches", 0), ("assignerTarget", 1e-6)]

    /// Ours, PyTorch's (scripts/torch_train_bench.py in `python`), ours again; every check
    /// must pass before the timings count.
    public func runAgainstTorch(python: String) throws -> Report {
        guard let script = ProjectPython.script("torch_train_bench.py") else {
            throw PeerError("scripts/torch_train_bench.py not found: run from the repository root")
        }
        let py = ProjectPython(python)
        guard py.canImport("torch, safetensors") else {
            throw PeerError("\(python) cannot import torch and safetensors: `make bench-torch` creates .venv-torch with them")
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("quantlab-torch-\(ProcessInfo.processInfo.processIdentifier)-\(UUID().uuidString)")
        try AtomicFile.createFolder(dir)
        defer { try? FileManager.default.removeItem(at: dir) }

        let w = workload()
        let model = w.model
        let config = model.config, trainFormParameters = model.parameterCount
        try SafeTensors.save(model.stateDict(), to: dir.appendingPathComponent("weights.safetensors"))
        // our outputs, loss and gradients on the batch, from the initial weights
        model.train(true)
        let (c, d) = model(w.images)
        let (total, _) = DetectionLoss()(model, classLogits: c, distances: d, labels: w.labels)
        total.backward()
        var reference: [(String, Tensor)] = [("images", w.images), ("classLogits", c.detached()), ("distances", d.detached()),
                                             ("loss", Tensor([total.item()], shape: []))]
        for (name, p) in model.namedParameters() { reference.append(("grad." + name, p.grad ?? Tensor(zeros: p.shape))) }
        let assigned = DetectionLoss().assignments(model, classLogits: c, distances: d, labels: w.labels)
        reference.append(("assign.gt", Tensor(assigned.flatMap { $0.gtIndex.map(Float.init) }, shape: [batch, model.anchors.count])))
        reference.append(("assign.target", Tensor(assigned.flatMap { $0.targetScore.map(Float.init) }, shape: [batch, model.anchors.count])))
        model.zeroGrad()

        let arch: [String: Any] = [
            "block": config.block.rawValue, "numClasses": config.numClasses, "inputSize": config.inputSize,
            "backboneWidths": config.backboneWidths, "backboneDepths": config.backboneDepths,
            "neckWidths": config.neckWidths, "neckDepths": config.neckDepths,
            "stateDict": model.stateDict().map { [$0.0, $0.1.shape] as [Any] },
            "labels": w.labels.map { $0.map { ["box": [$0.box.x1, $0.box.y1, $0.box.x2, $0.box.y2], "class": $0.classIndex] as [String: Any] } },
            "optimizer": ["learningRate": Double(Self.learningRate), "momentum": Double(Self.momentum), "nesterov": true,
                          "weightDecay": Double(Self.weightDecay)],
            "loss": lossSettings(DetectionLoss()),
            "threads": Kernels.threads, "warmup": warmup, "steps": steps,
        ]
        try AtomicFile.write(try JSONSerialization.data(withJSONObject: arch, options: [.sortedKeys]), to: dir.appendingPathComponent("arch.json"))

        log("ours: \(config.block.rawValue) detector, \(model.parameterCount) parameters, batch \(batch), \(inputSize) px, \(Kernels.summary)")
        let lossSeconds = withNoGrad {
            let (c, d) = model(w.images)
            return Self.time(warmup: 1, steps: 5) { _ = DetectionLoss()(model, classLogits: c, distances: d, labels: w.labels) }
        }

        // deploy form of the initial model (the same seed), fused; its outputs are the
        // reference PyTorch's deploy model is checked against
        let deployed = workload().model
        deployed.train(false)
        deployed.convertToDeployForm()
        let (dc, dd) = withNoGrad { deployed(w.images) }
        reference += [("deploy.classLogits", dc), ("deploy.distances", dd)]
        try SafeTensors.save(deployed.stateDict(), to: dir.appendingPathComponent("deploy.safetensors"))
        try SafeTensors.save(reference, to: dir.appendingPathComponent("reference.safetensors"))

        log("PyTorch (\(python)): same model, weights, batch and threads; checking it computes our function ...")
        let peer = try TorchSession(python: py, arguments: [script, dir.path], errors: dir.appendingPathComponent("stderr.txt"))
        defer { peer.close() }
        let obj = try peer.readObject()
        guard let check = obj["check"] as? [String: Any] else { throw PeerError("PyTorch side: no checks in its report") }
        var checks: [String: Double] = [:]
        for (k, v) in check { if let x = v as? Double { checks[k] = x } }
        let worst = check["worstGradient"] as? String ?? "?"
        if let rows = obj["checkRows"] as? [String: [String: Double]] {
            let bound = { (r: [String: Double]) in (r["ours"] ?? .infinity) / max(10 * (r["torch"] ?? 0), 1e-4) }
            for (k, r) in rows.sorted(by: { bound($0.value) > bound($1.value) }).prefix(3) {
                log(String(format: "  %@: ours vs float64 %.2e, PyTorch float32 vs float64 %.2e", k, r["ours"] ?? .nan, r["torch"] ?? .nan))
            }
        }
        let parameters = obj["parameters"] as? Int ?? -1
        guard parameters == trainFormParameters else {
            throw PeerError("PyTorch's model has \(parameters) parameters, ours \(trainFormParameters)")
        }
        for (k, v) in checks.sorted(by: { $0.key < $1.key }) {
            log(String(format: "  check %@: %.2e%@", k, v, k == "gradientBound" ? " (worst: \(worst))" : ""))
        }
        for (key, limit) in Self.checkLimits {
            guard let v = checks[key], v <= limit else {
                throw PeerError(String(format: "check %@: %@ > %.0e, so PyTorch's model is not computing our function and no timing is reported",
                                       key, checks[key].map { String(format: "%.2e", $0) } ?? "missing", limit))
            }
        }

        // timing, interleaved: the VM's speed drifts by tens of percent within a minute, so
        // each round times a few of our steps, then as many of PyTorch's (its warm-up is done)
        let step = trainingStep(workload())
        _ = try timeTraining(step, steps: 0)
        let infer = { _ = withNoGrad { deployed(w.images) } }
        _ = Self.time(warmup: warmup, steps: 0, infer)
        let rounds = max(1, min(rounds, steps)), k = max(1, steps / rounds)
        var ours = Side(trainSeconds: [], inferenceSeconds: []), torch = ours
        for r in 0..<rounds {
            ours.trainSeconds += try timeTraining(step, steps: k)
            torch.trainSeconds += try peer.time("train", k)
            ours.inferenceSeconds += Self.time(warmup: 0, steps: k, infer)
            torch.inferenceSeconds += try peer.time("infer", k)
            log(String(format: "  round %d/%d: training step median ours %.3f s, PyTorch %.3f s; inference ours %.3f s, PyTorch %.3f s", r + 1, rounds,
                       Report.median(Array(ours.trainSeconds.suffix(k))), Report.median(Array(torch.trainSeconds.suffix(k))),
                       Report.median(Array(ours.inferenceSeconds.suffix(k))), Report.median(Array(torch.inferenceSeconds.suffix(k)))))
        }
        peer.close()

        let profile = (obj["trainProfile"] as? [[String: Any]] ?? []).map {
            ProfileRow(op: $0["op"] as? String ?? "?", selfSeconds: $0["selfSeconds"] as? Double ?? 0, calls: $0["calls"] as? Int ?? 0)
        }
        let formatter = ISO8601DateFormatter()
        return Report(cpu: Kernels.cpuName, isa: Kernels.isa.description, threads: Kernels.threads, block: config.block.rawValue, batch: batch, inputSize: inputSize,
                      parameters: parameters, rounds: rounds, ours: ours, torch: torch,
                      torchVersion: obj["torch"] as? String ?? "?", torchCPUCapability: obj["cpu_capability"] as? String ?? "?",
                      check: checks, worstGradient: worst, torchProfile: profile,
                      ourProfile: self.profile().map { ProfileRow(op: $0.key, selfSeconds: $0.seconds, calls: $0.calls) },
                      torchLossSeconds: obj["lossSeconds"] as? [Double] ?? [], ourLossSeconds: lossSeconds, date: formatter.string(from: Date()))
    }

    private func lossSettings(_ l: DetectionLoss) -> [String: Any] {
        ["topK": l.assigner.topK, "alpha": l.assigner.alpha, "beta": l.assigner.beta, "vflAlpha": l.vflAlpha, "vflGamma": l.vflGamma,
         "classWeight": l.classWeight, "boxWeight": l.boxWeight]
    }

    /// The lines `qlab bench --torch` ends with.
    public static func summary(_ r: Report) -> [String] {
        func ips(_ s: [Double]) -> Double { Double(r.batch) / Report.median(s) }
        let oursTrain = ips(r.ours.trainSeconds), oursInfer = ips(r.ours.inferenceSeconds)
        return [
            "\(r.cpu.map { "\($0); " } ?? "")\(r.isa) kernels, \(r.threads) threads; PyTorch \(r.torchVersion) (\(r.torchCPUCapability)); \(r.block) detector, \(r.parameters) parameters, batch \(r.batch), \(r.inputSize) px",
            String(format: "training step: ours %.1f img/s, PyTorch %.1f img/s: %.2fx PyTorch", oursTrain, ips(r.torch.trainSeconds), r.trainRatio),
            String(format: "inference (deploy form): ours %.1f img/s, PyTorch %.1f img/s: %.2fx PyTorch", oursInfer, ips(r.torch.inferenceSeconds), r.inferenceRatio),
            String(format: "loss with assigner, per batch: ours %.1f ms, PyTorch %.1f ms", 1e3 * Report.median(r.ourLossSeconds), 1e3 * Report.median(r.torchLossSeconds)),
        ]
    }
}

/// scripts/torch_train_bench.py as a running process: its first line is its report (checks,
/// profile); then "train K" / "infer K" lines are answered with K step times.
final class TorchSession {
    private let process: Process
    private let input: FileHandle, output: FileHandle
    private let errorsURL: URL
    private var buffer = Data()
    private var closed = false

    /// Standard error goes to `errors` (a file: a pipe nobody reads could fill and stall it).
    init(python: ProjectPython, arguments: [String], errors: URL) throws {
        process = python.process(arguments)
        let inPipe = Pipe(), outPipe = Pipe()
        errorsURL = errors
        guard FileManager.default.createFile(atPath: errors.path, contents: nil) else {
            throw TrainingBenchmark.PeerError("cannot create \(errors.path)")
        }
        process.standardInput = inPipe
        process.standardOutput = outPipe
        process.standardError = try FileHandle(forWritingTo: errors)
        do { try process.run() } catch {
            throw TrainingBenchmark.PeerError("cannot run \(python.python): \(error.localizedDescription)")
        }
        input = inPipe.fileHandleForWriting
        output = outPipe.fileHandleForReading
    }

    /// The next line of output as a JSON object; a failure names PyTorch's last words.
    func readObject() throws -> [String: Any] {
        while !buffer.contains(UInt8(ascii: "\n")) {
            let chunk = output.availableData
            if chunk.isEmpty { // ended
                process.waitUntilExit()
                let said = (try? String(contentsOf: errorsURL, encoding: .utf8)) ?? ""
                throw TrainingBenchmark.PeerError("PyTorch side ended (exit \(process.terminationStatus)): \(said.split(separator: "\n").suffix(4).joined(separator: " | "))")
            }
            buffer += chunk
        }
        let end = buffer.firstIndex(of: UInt8(ascii: "\n"))!
        let line = buffer[buffer.startIndex..<end]
        buffer = Data(buffer[buffer.index(after: end)...])
        guard let obj = try? JSONSerialization.jsonObject(with: line) as? [String: Any] else {
            throw TrainingBenchmark.PeerError("PyTorch side: a line that is not a JSON object: \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
        return obj
    }

    /// Seconds of each of K steps of `what` ("train" or "infer").
    func time(_ what: String, _ k: Int) throws -> [Double] {
        input.write(Data("\(what) \(k)\n".utf8))
        guard let seconds = try readObject()["seconds"] as? [Double], seconds.count == k else {
            throw TrainingBenchmark.PeerError("PyTorch side: no \(k) timings for \(what)")
        }
        return seconds
    }

    func close() {
        guard !closed else { return }
        closed = true
        try? input.write(contentsOf: Data("quit\n".utf8))
        try? input.close()
        process.waitUntilExit()
    }
}
