import Image
import VHD

/// The image formats this build knows. The only place in Storage that names a format:
/// everything else sees `ImageFormat` and `DiskImage`.
public enum Formats {
    public static let all: [any ImageFormat] = [VHDFormat()]
    public static var `default`: any ImageFormat { all[0] }
    public static func named(_ name: String) -> (any ImageFormat)? { all.first { $0.name == name } }
}
