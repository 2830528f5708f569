import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

/// A multi-instance inference server in one process, as Triton or a hand-written TensorRT
/// service runs one (exp06, `qlab serve-bench`): N preprocessing workers decode and transform
/// JPEG bytes into a bounded queue; M engine instances take what is waiting (up to `maxBatch`
/// images: dynamic batching without a delay) and run it. Every stage is timed, so the report
/// says which one limits throughput.
///
/// Threads: each worker and each instance is one thread. Instances run their kernels serially on
/// their own thread (`Kernels.serially`, as onnxruntime sessions with one intra-op thread) unless
/// `poolEngine` is set, when a single instance may use the kernel pool's threads.
public struct ServingConfig: Codable, Equatable, Sendable {
    public var workers = 1
    public var instances = 1
    public var maxBatch = 1
    /// Prepared images the queue holds before workers wait (backpressure).
    public var queueCapacity = 64
    /// Images to serve; the set is cycled when it has fewer.
    public var images = 400
    /// One instance using the kernel pool instead of a serial thread.
    public var poolEngine = false
    /// Preprocessing writes the INT8 engine's input codes itself (fused pipeline, INT8 plans).
    public var codesIn = false

    public init() {}
}

/// What one serving run measured. Shares are busy time over (wall time x threads of the stage).
public struct ServingReport: Codable, Sendable {
    public var config: ServingConfig
    public var pipeline: String
    public var served = 0
    /// Images whose file did not decode: counted and skipped, the server goes on.
    public var failed = 0
    public var failures: [String] = []
    public var wallSeconds = 0.0
    public var decodeSeconds = 0.0, transformSeconds = 0.0, engineSeconds = 0.0
    /// Time instances waited for work on an empty queue, and workers on a full one.
    public var engineStarvedSeconds = 0.0, workersBlockedSeconds = 0.0
    /// Process CPU time (user + system, getrusage) over the run.
    public var cpuSeconds = 0.0
    public var batches = 0

    public var imagesPerSecond: Double { Double(served) / max(wallSeconds, 1e-9) }
    public var preprocessShare: Double { (decodeSeconds + transformSeconds) / max(wallSeconds * Double(config.workers), 1e-9) }
    public var engineShare: Double { engineSeconds / max(wallSeconds * Double(config.instances), 1e-9) }
    /// CPU time over wall time: 1.0 is one core fully busy (the article's "CPU 100%").
    public var cpuUtilisation: Double { cpuSeconds / max(wallSeconds, 1e-9) }
    public var meanBatch: Double { Double(served) / Double(max(batches, 1)) }
    /// The stage whose threads were busier: the one that sets the pace.
    public var bottleneck: String { config.instances == 0 || preprocessShare >= engineShare ? "preprocessing" : "engine" }
    /// CPU milliseconds per image in each stage (what a stage costs, whatever the threads).
    public var msPerImage: (decode: Double, transform: Double, engine: Double) {
        let n = Double(max(served, 1))
        return (1000 * decodeSeconds / n, 1000 * transformSeconds / n, 1000 * engineSeconds / n)
    }

    public var summary: String {
        let ms = msPerImage
        var s = String(format: "%@ pipeline, %d worker(s), %d instance(s), max batch %d%@: %.1f img/s (%d served in %.2f s, mean batch %.2f)\n",
                       pipeline, config.workers, config.instances, config.maxBatch, config.codesIn ? ", int8 codes in" : "",
                       imagesPerSecond, served, wallSeconds, meanBatch)
        s += String(format: "  preprocessing busy %.0f%% (decode %.2f ms + transform %.2f ms per image), engine busy %.0f%% (%.2f ms per image)\n",
                    100 * preprocessShare, ms.decode, ms.transform, 100 * engineShare, ms.engine)
        s += String(format: "  engine starved %.2f s, workers blocked %.2f s; CPU %.0f%% (%.2f s user+sys); bottleneck: %@",
                    engineStarvedSeconds, workersBlockedSeconds, 100 * cpuUtilisation, cpuSeconds, bottleneck)
        if failed > 0 { s += "\n  \(failed) image(s) failed to decode and were skipped, e.g. \(failures.first ?? "")" }
        return s
    }
}

/// One engine instance: plans traced at a few batch sizes (shapes are fixed at trace time, as a
/// TensorRT engine's optimisation profiles), each run on the smallest that holds the batch,
/// padded. Instances do not share plans (a plan keeps scratch buffers between runs).
public final class ServingInstance: @unchecked Sendable {
    let plans: [(batch: Int, plan: Int8Plan)]

    public init(plans: [Int8Plan]) throws {
        guard !plans.isEmpty else { throw EngineError("a serving instance needs at least one plan") }
        var sized: [(Int, Int8Plan)] = []
        for p in plans {
            guard p.graph.inputs.count == 1 else { throw EngineError("serving plans take one input") }
            sized.append((p.graph.values[p.graph.inputs[0]].shape[0], p))
        }
        self.plans = sized.sorted { $0.0 < $1.0 }
    }

    public var maxBatch: Int { plans.last!.batch }
    var inputShape: [Int] { plans[0].plan.graph.values[plans[0].plan.graph.inputs[0]].shape }
    /// Whether every plan starts by quantizing its input at one amax (codes can be fed).
    public var inputAmax: Float? {
        let amaxes = plans.map(\.plan.inputAmax)
        guard let first = amaxes.first ?? nil, amaxes.allSatisfy({ $0 == first }) else { return nil }
        return first
    }

    /// The smallest plan that holds `n` images, and its traced batch.
    private func plan(for n: Int) throws -> (batch: Int, plan: Int8Plan) {
        guard let p = plans.first(where: { $0.batch >= n }) else { throw EngineError("batch \(n) exceeds the largest plan's \(maxBatch)") }
        return p
    }

    /// Runs images given as floats (CHW each), each copied straight into the zero-padded batch.
    func run(floats images: [[Float]]) throws -> [Tensor] {
        let (b, plan) = try plan(for: images.count)
        let per = inputShape.dropFirst().reduce(1, *)
        let x = Tensor(zeros: [b] + Array(inputShape.dropFirst()))
        for (k, image) in images.enumerated() {
            guard image.count == per else { throw EngineError("image \(k): \(image.count) values, the plan takes \(per)") }
            (x.data + k * per).update(from: image, count: per)
        }
        return try plan.run([x])
    }

    /// Runs images given as int8 codes (NHWC each), joined and zero-padded to the plan's batch.
    func run(codes images: [[Int8]]) throws -> [Tensor] {
        let (b, plan) = try plan(for: images.count)
        let per = inputShape.dropFirst().reduce(1, *)
        var codes: [Int8] = []
        codes.reserveCapacity(b * per)
        for image in images { codes += image }
        codes += [Int8](repeating: 0, count: (b - images.count) * per)
        return try plan.run(inputCodes: codes)
    }
}

/// Runs the server over in-memory JPEG files (read once beforehand, so that disk speed is not
/// measured): returns the report; a file that fails to decode is counted, never fatal. With no
/// instances (`config.instances == 0`) the queue is drained unread: preprocessing alone.
public func serve(files: [(name: String, data: Data)], preprocessor: ServingPreprocessor, instances: [ServingInstance],
                  config: ServingConfig, progressLabel: String? = nil) throws -> ServingReport {
    guard !files.isEmpty else { throw EngineError("no images to serve") }
    guard config.workers >= 1, config.instances >= 0, config.maxBatch >= 1, config.queueCapacity >= 1, config.images >= 1 else {
        throw EngineError("serving needs >= 1 worker, batch, queue slot and image: \(config)")
    }
    guard instances.count == config.instances else { throw EngineError("\(config.instances) instances configured, \(instances.count) given") }
    guard !config.poolEngine || config.instances == 1 else { throw EngineError("poolEngine: the kernel pool serves one instance") }
    let size = preprocessor.size
    let per = 3 * size * size
    var codeTable: [Int8] = []
    if config.codesIn {
        guard preprocessor.pipeline == .fused else { throw EngineError("int8 codes in need the fused pipeline") }
        if let first = instances.first {
            guard let amax = first.inputAmax, instances.allSatisfy({ $0.inputAmax == amax }) else {
                throw EngineError("int8 codes in need INT8 plans that quantize their input first, at one scale")
            }
            codeTable = preprocessor.codeTable(amax: amax)
        } else {
            codeTable = preprocessor.codeTable(amax: 1) // preprocessing alone: the cost does not depend on the scale
        }
    }
    let table = codeTable
    for i in instances {
        guard i.inputShape.dropFirst() == [3, size, size] else { throw EngineError("instance input \(i.inputShape) does not take \(size) x \(size) images") }
        guard i.maxBatch >= config.maxBatch else { throw EngineError("max batch \(config.maxBatch) exceeds an instance's plans (\(i.maxBatch))") }
    }

    struct Prepared { var floats: [Float]; var codes: [Int8] }
    let queue = BoundedQueue<Prepared>(capacity: config.queueCapacity)
    let state = ServingState()
    let progress = progressLabel.map { Progress(total: config.images, label: $0, unit: "img") }
    let start = cpuTime(), wall = Stopwatch()
    let group = DispatchGroup()

    for _ in 0..<config.workers {
        spawn(group) {
            var timing = ServingPreprocessor.Timing()
            var blocked = 0.0
            while let i = state.claim(config.images) {
                let (name, data) = files[i % files.count]
                var item = Prepared(floats: [], codes: [])
                do {
                    if config.codesIn {
                        item.codes = [Int8](repeating: 0, count: per)
                        _ = try item.codes.withUnsafeMutableBufferPointer { try preprocessor.prepareCodes(data, source: name, table: table, into: $0.baseAddress!, timing: &timing) }
                    } else {
                        item.floats = [Float](repeating: 0, count: per)
                        _ = try item.floats.withUnsafeMutableBufferPointer { try preprocessor.prepare(data, source: name, into: $0.baseAddress!, timing: &timing) }
                    }
                } catch {
                    state.fail("\(error)")
                    continue
                }
                blocked += queue.push(item)
            }
            state.addWorker(timing, blocked: blocked)
        }
    }
    let workersDone = DispatchGroup()
    workersDone.enter()
    DispatchQueue.global().async { group.wait(); queue.close(); workersDone.leave() }

    let engines = DispatchGroup()
    for instance in instances {
        spawn(engines) {
            var busy = 0.0, starved = 0.0, batches = 0
            let body = {
                while true {
                    let (items, waited) = queue.pop(upTo: config.maxBatch)
                    starved += waited
                    guard let items else { break }
                    let engineClock = Stopwatch()
                    do {
                        _ = try config.codesIn ? instance.run(codes: items.map(\.codes)) : instance.run(floats: items.map(\.floats))
                    } catch { state.fail("engine: \(error)") }
                    busy += engineClock.seconds
                    batches += 1
                    let done = state.addServed(items.count)
                    progress?.update(done)
                }
            }
            if config.poolEngine { body() } else { Kernels.serially(body) }
            state.addInstance(busy: busy, starved: starved, batches: batches)
        }
    }
    if instances.isEmpty { // preprocessing alone: one thread drains the queue
        spawn(engines) {
            var starved = 0.0
            while true {
                let (items, waited) = queue.pop(upTo: config.queueCapacity)
                starved += waited
                guard let items else { break }
                let done = state.addServed(items.count)
                progress?.update(done)
            }
            state.addInstance(busy: 0, starved: starved, batches: 0)
        }
    }
    engines.wait()
    workersDone.wait()
    progress?.finish()

    var report = ServingReport(config: config, pipeline: preprocessor.pipeline.rawValue)
    report.wallSeconds = wall.seconds
    report.cpuSeconds = cpuTime() - start
    state.fill(&report)
    return report
}

/// Seconds of CPU (user + system) this process has used.
public func cpuTime() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    func s(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
    return s(u.ru_utime) + s(u.ru_stime)
}

/// A dedicated thread (not a Dispatch worker: those are capped and shared) in `group`.
private func spawn(_ group: DispatchGroup, _ body: @escaping @Sendable () -> Void) {
    group.enter()
    let thread = Thread { body(); group.leave() }
    thread.stackSize = 8 << 20
    thread.start()
}

/// Counters shared by the server's threads, under one lock.
private final class ServingState: @unchecked Sendable {
    private let lock = NSLock()
    private var next = 0, served = 0, failed = 0, failures: [String] = []
    private var decode = 0.0, transform = 0.0, blocked = 0.0, busy = 0.0, starved = 0.0, batches = 0

    func claim(_ total: Int) -> Int? {
        lock.lock(); defer { lock.unlock() }
        guard next < total else { return nil }
        next += 1
        return next - 1
    }
    func fail(_ message: String) {
        lock.lock(); defer { lock.unlock() }
        failed += 1
        if failures.count < 5 { failures.append(message) }
    }
    func addServed(_ n: Int) -> Int { lock.lock(); defer { lock.unlock() }; served += n; return served + failed }
    func addWorker(_ t: ServingPreprocessor.Timing, blocked b: Double) {
        lock.lock(); defer { lock.unlock() }
        decode += t.decode; transform += t.transform; blocked += b
    }
    func addInstance(busy b: Double, starved s: Double, batches n: Int) {
        lock.lock(); defer { lock.unlock() }
        busy += b; starved += s; batches += n
    }
    func fill(_ r: inout ServingReport) {
        lock.lock(); defer { lock.unlock() }
        r.served = served; r.failed = failed; r.failures = failures
        r.decodeSeconds = decode; r.transformSeconds = transform; r.engineSeconds = busy
        r.workersBlockedSeconds = blocked; r.engineStarvedSeconds = starved; r.batches = batches
    }
}

/// A FIFO of bounded size: `push` waits while full, `pop` while empty; both return the seconds
/// they waited. After `close`, `pop` drains what is left, then returns nil.
final class BoundedQueue<T>: @unchecked Sendable {
    private let condition = NSCondition()
    private var items: [T] = []
    private var head = 0
    private var closed = false
    let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    @discardableResult
    func push(_ item: T) -> Double {
        condition.lock(); defer { condition.unlock() }
        let clock = Stopwatch()
        var waited = false
        while items.count - head >= capacity { waited = true; condition.wait() }
        items.append(item)
        condition.broadcast()
        return waited ? clock.seconds : 0
    }

    /// Up to `n` items (at least one, waiting for it), or nil once closed and empty.
    func pop(upTo n: Int) -> ([T]?, Double) {
        condition.lock(); defer { condition.unlock() }
        let clock = Stopwatch()
        while items.count == head && !closed { condition.wait() }
        let waited = clock.seconds
        if items.count == head { return (nil, waited) }
        let k = min(n, items.count - head)
        let out = Array(items[head..<(head + k)])
        head += k
        if head > 1024 && head * 2 > items.count { items.removeFirst(head); head = 0 }
        condition.broadcast()
        return (out, waited)
    }

    func close() {
        condition.lock(); defer { condition.unlock() }
        closed = true
        condition.broadcast()
    }
}

/// The decode floor of a CPU pipeline on libjpeg-turbo: seconds per image (the best of
/// `passes` passes over `files` on the calling thread) to decode at 1/8 of the size, where every
/// block's Huffman codes are still read but each inverse DCT is one value and the image left to
/// convert is 1/64 of the pixels. Entropy decoding is serial within a JPEG without restart
/// markers, and no scale reads fewer codes, so no pipeline decodes these files for less per
/// image on this core: it bounds what any fused pipeline can gain over a full decode. Files
/// that fail to decode are skipped (nil when none decodes).
public func jpegDecodeFloor(files: [(name: String, data: Data)], passes: Int = 2) -> Double? {
    var best = Double.infinity
    for _ in 0..<max(passes, 1) {
        var decoded = 0
        let clock = Stopwatch()
        for f in files where (try? JPEG.withDecoded(f.data, source: f.name, scaleDenominator: 8) { _, _, _ in }) != nil { decoded += 1 }
        let seconds = clock.seconds
        if decoded > 0 { best = min(best, seconds / Double(decoded)) }
    }
    return best.isFinite ? best : nil
}

/// The JPEG files (.jpg, .jpeg) directly in `folder`, sorted by name, read into memory.
public func readServingImages(_ folder: URL, limit: Int? = nil) throws -> [(name: String, data: Data)] {
    let names: [String]
    do { names = try FileManager.default.contentsOfDirectory(atPath: folder.path) } catch {
        throw EngineError("--images: cannot list \(folder.path) (\(error.localizedDescription))")
    }
    let jpegs = names.filter { ["jpg", "jpeg"].contains(($0 as NSString).pathExtension.lowercased()) }.sorted()
    guard !jpegs.isEmpty else { throw EngineError("--images: no .jpg or .jpeg files in \(folder.path)") }
    return try jpegs.prefix(limit ?? jpegs.count).map { name in
        let url = folder.appendingPathComponent(name)
        do { return (url.path, try Data(contentsOf: url)) } catch {
            throw EngineError("\(url.path): cannot read (\(error.localizedDescription))")
        }
    }
}

/// `count` serving instances of a detector: its traced graph (FP32, or the Q/DQ graph when a
/// simulator is installed on it) as plans at batch 1, 2, 4, ... up to `maxBatch`.
public func servingInstances(_ model: YOLOv6, count: Int, maxBatch: Int) throws -> [ServingInstance] {
    var sizes = [1]
    while sizes.last! < maxBatch { sizes.append(min(sizes.last! * 2, maxBatch)) }
    let graphs = try sizes.map { try Graph.trace(model, batch: $0) }
    return try (0..<count).map { _ in try ServingInstance(plans: try graphs.map { try Int8Plan($0) }) }
}
