/// Stops the program with `message` when `condition` is false: a programming error inside the
/// library (two ops whose shapes do not fit, say), not bad input, which is thrown.
///
/// Swift's `precondition` drops its message in optimized builds, so a release run would stop
/// with "precondition failure" and no word on which shapes; this keeps the message everywhere.
@inline(__always)
public func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                    file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError(message(), file: file, line: line) }
}
