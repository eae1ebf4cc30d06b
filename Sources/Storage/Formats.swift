import Image
import QCOW2
import RawImage
import VHD

/// The image formats this build knows. The only place in Storage that names a format:
/// everything else sees `ImageFormat`, `DiskImage` and `StreamFormat`.
public enum Formats {
    public static let all: [any ImageFormat] = [VHDFormat(), RawFormat(), QCOW2Format()]
    public static var `default`: any ImageFormat { all[0] }
    public static func named(_ name: String) -> (any ImageFormat)? { all.first { $0.name == name } }

    /// Formats of export and import streams (`format=`), the default first.
    public static let streams: [any StreamFormat] = [RawStreamFormat(), VHDStreamFormat()]
    public static func stream(named name: String) -> (any StreamFormat)? { streams.first { $0.name == name } }
}
