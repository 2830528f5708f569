import Foundation

/// Errors reading a safetensors file; each names the file (when known) and what is wrong.
public struct SafeTensorsError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Element types of the safetensors format that QuantLab reads (all convert to float32).
public enum SafeTensorsDType: String, Sendable, CaseIterable {
    case F64, F32, F16, BF16, I64, I32, I16, I8, U8

    public var size: Int {
        switch self {
        case .F64, .I64: return 8
        case .F32, .I32: return 4
        case .F16, .BF16, .I16: return 2
        case .I8, .U8: return 1
        }
    }
}

/// The safetensors format (huggingface/safetensors), so that Python's `safetensors` opens
/// our checkpoints and we open theirs:
///
///     [u64 little-endian N][N bytes of JSON header][data buffer]
///     header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
///              "__metadata__": {"key": "value"}}      offsets are relative to the buffer
///
/// Reading validates everything before touching the data: header size within the file,
/// well-formed JSON, known dtypes, non-negative shapes, offsets inside the buffer whose
/// length equals numel * dtype size, and tensors that tile the buffer without gaps or
/// overlaps (as the reference implementation requires). A bad file is a thrown error
/// naming the file and the field, never a crash or an out-of-bounds read.
public struct SafeTensorsFile {
    public struct Entry: Equatable {
        public let name: String
        public let dtype: SafeTensorsDType
        public let shape: [Int]
        public let range: Range<Int> // within the data buffer
    }

    public let entries: [Entry] // in file order of data offsets
    public let metadata: [String: String]
    private let buffer: Data
    private let source: String

    /// Upper bound on the header, as the reference implementation (100 MB).
    public static let maxHeaderSize = 100_000_000

    public init(contentsOf url: URL) throws {
        let data: Data
        do { data = try Data(contentsOf: url, options: .mappedIfSafe) } catch {
            throw SafeTensorsError("\(url.path): cannot read file (\(error.localizedDescription))")
        }
        try self.init(data: data, source: url.path)
    }

    public init(data: Data, source: String = "<memory>") throws {
        self.source = source
        func fail(_ m: String) -> SafeTensorsError { SafeTensorsError("\(source): \(m)") }
        guard data.count >= 8 else { throw fail("file is \(data.count) bytes, shorter than the 8-byte header length") }
        let n = data.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        guard n <= UInt64(Self.maxHeaderSize) else { throw fail("header length \(n) exceeds the limit of \(Self.maxHeaderSize) bytes") }
        guard n <= UInt64(data.count - 8) else { throw fail("header length \(n) runs past the end of the file (\(data.count) bytes): truncated?") }
        let headerEnd = 8 + Int(n)
        let headerBytes = data.subdata(in: data.startIndex + 8 ..< data.startIndex + headerEnd)
        guard let root = try? JSONSerialization.jsonObject(with: headerBytes), let dict = root as? [String: Any] else {
            throw fail("header is not a JSON object")
        }
        let buffer = data.subdata(in: data.startIndex + headerEnd ..< data.endIndex)
        var entries: [Entry] = []
        var metadata: [String: String] = [:]
        for (name, value) in dict {
            if name == "__metadata__" {
                guard let m = value as? [String: Any] else { throw fail("__metadata__ is not an object") }
                for (k, v) in m {
                    guard let s = v as? String else { throw fail("__metadata__.\(k) is not a string") }
                    metadata[k] = s
                }
                continue
            }
            guard let info = value as? [String: Any] else { throw fail("tensor \(name): entry is not an object") }
            guard let dtypeName = info["dtype"] as? String else { throw fail("tensor \(name): missing field dtype") }
            guard let dtype = SafeTensorsDType(rawValue: dtypeName) else { throw fail("tensor \(name): unsupported dtype \(dtypeName)") }
            guard let shapeAny = info["shape"] as? [Any] else { throw fail("tensor \(name): missing field shape") }
            let shape = try shapeAny.map { (d: Any) -> Int in
                guard let n = d as? NSNumber, n.doubleValue == n.doubleValue.rounded(), n.doubleValue >= 0, n.doubleValue < Double(Int32.max) else {
                    throw fail("tensor \(name): shape \(shapeAny) has a dimension that is not a non-negative integer")
                }
                return n.intValue
            }
            guard let offs = info["data_offsets"] as? [Any], offs.count == 2,
                  let bn = offs[0] as? NSNumber, let en = offs[1] as? NSNumber,
                  bn.doubleValue == bn.doubleValue.rounded(), en.doubleValue == en.doubleValue.rounded(),
                  abs(bn.doubleValue) < 9e15, abs(en.doubleValue) < 9e15 else {
                throw fail("tensor \(name): data_offsets must be [begin, end]")
            }
            let b = bn.int64Value, e = en.int64Value
            guard 0 <= b, b <= e, e <= Int64(buffer.count) else {
                throw fail("tensor \(name): data_offsets [\(b), \(e)] outside the data buffer of \(buffer.count) bytes")
            }
            var numel: Int64 = 1
            for d in shape {
                let (p, overflow) = numel.multipliedReportingOverflow(by: Int64(d))
                guard !overflow else { throw fail("tensor \(name): shape \(shape) overflows") }
                numel = p
            }
            guard numel.multipliedReportingOverflow(by: Int64(dtype.size)) == (e - b, false) else {
                throw fail("tensor \(name): \(e - b) bytes for shape \(shape) of \(dtypeName) (expected \(numel * Int64(dtype.size)))")
            }
            entries.append(Entry(name: name, dtype: dtype, shape: shape, range: Int(b) ..< Int(e)))
        }
        entries.sort { ($0.range.lowerBound, $0.range.upperBound, $0.name) < ($1.range.lowerBound, $1.range.upperBound, $1.name) }
        var cursor = 0
        for e in entries {
            guard e.range.lowerBound == cursor else {
                throw fail(e.range.lowerBound < cursor ? "tensor \(e.name) overlaps the previous tensor" : "gap in the data buffer before tensor \(e.name)")
            }
            cursor = e.range.upperBound
        }
        guard cursor == buffer.count else { throw fail("data buffer has \(buffer.count - cursor) trailing bytes not covered by any tensor") }
        self.entries = entries
        self.metadata = metadata
        self.buffer = buffer
    }

    public var names: [String] { entries.map(\.name) }

    /// The named tensor converted to float32.
    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries.first(where: { $0.name == name }) else {
            throw SafeTensorsError("\(source): no tensor named \(name)")
        }
        return convert(e)
    }

    /// All tensors converted to float32, by name.
    public func tensors() -> [String: Tensor] {
        Dictionary(uniqueKeysWithValues: entries.map { ($0.name, convert($0)) })
    }

    /// Raw little-endian bytes of one tensor (for int8 engine weights).
    public func bytes(_ name: String) throws -> Data {
        guard let e = entries.first(where: { $0.name == name }) else {
            throw SafeTensorsError("\(source): no tensor named \(name)")
        }
        return buffer.subdata(in: buffer.startIndex + e.range.lowerBound ..< buffer.startIndex + e.range.upperBound)
    }

    private func convert(_ e: Entry) -> Tensor {
        let t = Tensor(zeros: e.shape)
        let out = t.data
        buffer.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            let src = UnsafeRawBufferPointer(rebasing: raw[e.range])
            let n = t.count
            switch e.dtype {
            case .F32: for i in 0..<n { out[i] = Float(bitPattern: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self).littleEndian) }
            case .F64: for i in 0..<n { out[i] = Float(Double(bitPattern: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self).littleEndian)) }
            case .F16:
                for i in 0..<n { out[i] = Float(Float16(bitPattern: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self).littleEndian)) }
            case .BF16:
                for i in 0..<n { out[i] = Float(bitPattern: UInt32(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self).littleEndian) << 16) }
            case .I64: for i in 0..<n { out[i] = Float(Int64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))) }
            case .I32: for i in 0..<n { out[i] = Float(Int32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))) }
            case .I16: for i in 0..<n { out[i] = Float(Int16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))) }
            case .I8: for i in 0..<n { out[i] = Float(src.load(fromByteOffset: i, as: Int8.self)) }
            case .U8: for i in 0..<n { out[i] = Float(src.load(fromByteOffset: i, as: UInt8.self)) }
            }
        }
        return t
    }
}

public enum SafeTensors {
    /// One tensor to write: float32 values, or raw bytes of another dtype.
    public enum Payload {
        case float32(Tensor)
        case raw(SafeTensorsDType, shape: [Int], bytes: Data)
    }

    /// Serialises tensors (in the given order) with optional string metadata.
    public static func encode(_ tensors: [(String, Payload)], metadata: [String: String] = [:]) throws -> Data {
        var header: [String: Any] = [:]
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var body = Data()
        for (name, payload) in tensors {
            guard header[name] == nil, name != "__metadata__" else { throw SafeTensorsError("duplicate or reserved tensor name \(name)") }
            let begin = body.count
            let dtype: SafeTensorsDType, shape: [Int]
            switch payload {
            case .float32(let t):
                dtype = .F32
                shape = t.shape
                var le = [UInt32](repeating: 0, count: t.count)
                for i in 0..<t.count { le[i] = t.data[i].bitPattern.littleEndian }
                le.withUnsafeBytes { body.append(contentsOf: $0) }
            case .raw(let d, let s, let bytes):
                guard bytes.count == s.reduce(1, *) * d.size else {
                    throw SafeTensorsError("tensor \(name): \(bytes.count) bytes for shape \(s) of \(d.rawValue)")
                }
                dtype = d
                shape = s
                body.append(bytes)
            }
            header[name] = ["dtype": dtype.rawValue, "shape": shape, "data_offsets": [begin, body.count]]
        }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        // Pad with spaces so the data buffer starts 8-byte aligned, as the Python writer does.
        while json.count % 8 != 0 { json.append(0x20) }
        var out = Data()
        var n = UInt64(json.count).littleEndian
        withUnsafeBytes(of: &n) { out.append(contentsOf: $0) }
        out.append(json)
        out.append(body)
        return out
    }

    /// Writes float32 tensors atomically: a temporary file in the same folder, then rename,
    /// so an interrupted save never leaves a half-written checkpoint.
    public static func save(_ tensors: [(String, Tensor)], metadata: [String: String] = [:], to url: URL) throws {
        try AtomicFile.write(encode(tensors.map { ($0.0, .float32($0.1)) }, metadata: metadata), to: url)
    }

    public static func load(from url: URL) throws -> (tensors: [String: Tensor], metadata: [String: String]) {
        let file = try SafeTensorsFile(contentsOf: url)
        return (file.tensors(), file.metadata)
    }
}

/// Write-then-rename, so readers see either the old file or the whole new one.
/// Writes a file so that a reader (or a run killed half-way) sees the old file or the new
/// one, never a mix: a temporary file beside it, flushed to disk, then renamed over it.
/// Temporaries are named `.<name>.<pid>.tmp`; `isTemporary` recognises them for clean-up.
/// Why a file operation failed, in words: Foundation's own message is "The operation could not
/// be completed" plus a domain code.
public func failureReason(_ error: Error) -> String {
    let e = error as NSError
    return e.localizedFailureReason ?? e.userInfo[NSUnderlyingErrorKey].map { "\($0)" } ?? e.localizedDescription
}

/// A file that could not be written; the message names it and the reason.
public struct FileWriteError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ message: String) { description = message }
}

public enum AtomicFile {
    /// Creates a folder (and its parents), or throws a `FileWriteError` naming it and why.
    public static func createFolder(_ url: URL) throws {
        do { try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true) } catch {
            throw FileWriteError("cannot create the folder \(url.path) (\(failureReason(error)))")
        }
    }

    public static func isTemporary(_ name: String) -> Bool { name.hasPrefix(".") && name.hasSuffix(".tmp") }

    public static func write(_ data: Data, to url: URL) throws {
        let dir = url.deletingLastPathComponent()
        try createFolder(dir)
        let tmp = dir.appendingPathComponent(".\(url.lastPathComponent).\(ProcessInfo.processInfo.processIdentifier).tmp")
        do {
            do {
                try data.write(to: tmp)
                let handle = try FileHandle(forUpdating: tmp)
                try handle.synchronize()
                try handle.close()
            } catch {
                throw FileWriteError("\(url.path): cannot write (\(failureReason(error)))")
            }
            guard rename(tmp.path, url.path) == 0 else {
                throw SafeTensorsError("\(url.path): rename from temporary file failed (errno \(errno))")
            }
        } catch {
            try? FileManager.default.removeItem(at: tmp)
            throw error
        }
    }
}
