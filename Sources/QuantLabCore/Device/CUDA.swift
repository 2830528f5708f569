import CQLCuda
import Foundation

/// Where a tensor's storage lives.
public enum Device: String, Equatable, Sendable, CustomStringConvertible {
    case cpu, cuda
    public var description: String { rawValue }
}

public struct DeviceError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The CUDA plugin, opened once at run time.
///
/// Search order for `libqlcuda.so`: the `QL_CUDA_PLUGIN` environment variable, then
/// `.build/cuda/` under the current directory, then beside the running executable's build
/// folder. The outcome is one of: plugin not built, plugin unusable, no driver or device
/// (the normal case on a CPU-only machine), or ready. Without a device everything runs on
/// the CPU; `notice` is the one line to show a user.
public final class CUDA: @unchecked Sendable { // immutable after init
    public enum Status: Equatable, Sendable {
        case pluginNotBuilt(searched: [String])
        case pluginUnusable(String)
        case noDevice(String)
        case ready(name: String, smCount: Int, memoryBytes: Int, computeCapability: String)
    }

    public static let shared = CUDA()

    public let status: Status
    public let pluginPath: String?
    /// The kernel table, present whenever the plugin loaded (even without a device).
    public let api: UnsafePointer<qlc_api>?

    public var isReady: Bool { if case .ready = status { return true } else { return false } }

    /// The device's compute capability as major*10 + minor (90 for an H100), nil without one.
    public var computeCapability: Int? { if case .ready(_, _, _, let cc) = status { return Int(cc) } else { return nil } }

    /// Why there is no usable device, nil when there is one.
    public var unavailableReason: String? {
        switch status {
        case .pluginNotBuilt: return "plugin not built (make cuda)"
        case .pluginUnusable(let why): return "plugin unusable (\(why))"
        case .noDevice(let why): return "no device (\(why))"
        case .ready: return nil
        }
    }

    /// One line for logs: the device, or why there is none and that work runs on the CPU.
    public var notice: String {
        if let unavailableReason { return "cuda: \(unavailableReason); running on CPU" }
        guard case .ready(let name, let sms, let mem, let cc) = status else { return "cuda: unknown state" }
        return "cuda: \(name), \(sms) SMs, sm_\(cc), \(String(format: "%.1f", Double(mem) / 1_073_741_824)) GiB"
    }

    static func candidatePaths() -> [String] {
        var paths: [String] = []
        if let env = ProcessInfo.processInfo.environment["QL_CUDA_PLUGIN"] { paths.append(env) }
        paths.append(FileManager.default.currentDirectoryPath + "/.build/cuda/libqlcuda.so")
        // .build/<config>/qlab -> .build/cuda/libqlcuda.so
        let exe = URL(fileURLWithPath: CommandLine.arguments.first ?? "").resolvingSymlinksInPath()
        paths.append(exe.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("cuda/libqlcuda.so").path)
        return paths
    }

    init() {
        let paths = Self.candidatePaths()
        guard let path = paths.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            (status, pluginPath, api) = (.pluginNotBuilt(searched: paths), nil, nil)
            return
        }
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "dlopen failed"
            (status, pluginPath, api) = (.pluginUnusable("\(path): \(why)"), path, nil)
            return
        }
        guard let symbol = dlsym(handle, "qlc_get_api") else {
            (status, pluginPath, api) = (.pluginUnusable("\(path) has no qlc_get_api"), path, nil)
            return
        }
        let getAPI = unsafeBitCast(symbol, to: qlc_get_api_fn.self)
        guard let table = getAPI(QLC_ABI_VERSION) else {
            (status, pluginPath, api) = (.pluginUnusable("\(path) was built for another ABI version (expected \(QLC_ABI_VERSION))"), path, nil)
            return
        }
        var info = qlc_device_info()
        let st = table.pointee.device_info(&info)
        if st == QLC_OK {
            let name = withUnsafeBytes(of: info.name) { raw in String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self) }
            status = .ready(name: name, smCount: Int(info.sm_count), memoryBytes: Int(info.total_memory),
                            computeCapability: "\(info.cc_major)\(info.cc_minor)")
        } else {
            status = .noDevice(table.pointee.last_error().map { String(cString: $0) } ?? "unknown")
        }
        pluginPath = path
        api = table
    }

    /// The kernel table of a ready device, or an error that says why there is none.
    public func requireDevice() throws -> qlc_api {
        guard isReady, let api else { throw DeviceError(notice) }
        return api.pointee
    }

    /// Turns a plugin status into a thrown error naming the call and CUDA's reason.
    public func check(_ status: Int32, _ what: String) throws {
        guard status == QLC_OK else {
            let why = api.flatMap { $0.pointee.last_error() }.map { String(cString: $0) } ?? "no plugin"
            throw DeviceError("cuda \(what) failed (\(status)): \(why)")
        }
    }
}

/// Device memory of tensors, kept for reuse (as PyTorch's caching allocator): cudaMalloc is
/// slow and cudaFree waits for the whole device, so a tensor's buffer goes back to a free list
/// by size when the tensor dies and the next tensor of that size class takes it, instead of a
/// free and a malloc per op. Every kernel runs on the one default stream, so a buffer handed
/// out again is written only after the kernels that read it before, in stream order. Sizes are
/// rounded up to a power of two (at least 256 floats), so a buffer serves a range of sizes.
/// Memory held: the peak of live tensors per size class; it is not returned before exit.
public final class DeviceMemoryPool: @unchecked Sendable { // state under `lock`
    public static let shared = DeviceMemoryPool()
    private let lock = NSLock()
    private var free: [Int: [CUDABuffer<Float>]] = [:]
    /// Buffers made, and buffers handed out again (tests and reports).
    public private(set) var allocated = 0, reused = 0

    static func sizeClass(_ count: Int) -> Int { max(256, 1 << (Int.bitWidth - (max(count, 1) - 1).leadingZeroBitCount)) }

    func take(_ count: Int) throws -> CUDABuffer<Float> {
        let size = Self.sizeClass(count)
        lock.lock()
        if let b = free[size]?.popLast() {
            reused += 1
            lock.unlock()
            return b
        }
        allocated += 1
        lock.unlock()
        return try CUDABuffer<Float>(count: size)
    }

    func give(_ buffer: CUDABuffer<Float>) {
        lock.lock()
        free[buffer.count, default: []].append(buffer)
        lock.unlock()
    }
}

/// A typed buffer in device memory, freed with its owner.
public final class CUDABuffer<Element>: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let count: Int
    private let api: qlc_api

    public init(count: Int) throws {
        api = try CUDA.shared.requireDevice()
        var p: UnsafeMutableRawPointer?
        try CUDA.shared.check(api.malloc(&p, max(count, 1) * MemoryLayout<Element>.stride), "malloc of \(count) elements")
        pointer = p!
        self.count = count
    }

    public convenience init(_ values: [Element]) throws {
        try self.init(count: values.count)
        try upload(values)
    }

    deinit { _ = api.free(pointer) }

    public var typed: UnsafeMutablePointer<Element> { pointer.assumingMemoryBound(to: Element.self) }

    public func upload(_ values: [Element]) throws {
        require(values.count <= count, "upload of \(values.count) into \(count)")
        try values.withUnsafeBytes { raw in
            try CUDA.shared.check(api.memcpy_h2d(pointer, raw.baseAddress, raw.count, nil), "upload")
        }
        try CUDA.shared.check(api.stream_synchronize(nil), "synchronize")
    }

    public func download() throws -> [Element] {
        var out = [Element](unsafeUninitializedCapacity: count) { _, n in n = count }
        try out.withUnsafeMutableBytes { raw in
            try CUDA.shared.check(api.memcpy_d2h(raw.baseAddress, pointer, raw.count, nil), "download")
        }
        try CUDA.shared.check(api.stream_synchronize(nil), "synchronize")
        return out
    }
}
