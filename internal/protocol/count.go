package protocol

// A key's count (keys.Space.Count) holds two numbers in one integer, so
// that the merge script keeps both with one INCRBY: the key's items times
// countUnit, plus the length of its array minus one. Lua's numbers are
// doubles, exact up to 2^53: a key holds at most MaxKeyItems items.
const (
	countUnit   = 1 << 30 // past the largest string, 512 MiB
	MaxKeyItems = 1<<23 - 1
)

// UnpackCount returns the items and the array length (bytes) a count value
// records.
func UnpackCount(v int64) (items, bytes int64) { return v / countUnit, v%countUnit + 1 }

// PackCount returns the count value of an array of items items and bytes
// bytes.
func PackCount(items, bytes int64) int64 { return items*countUnit + bytes - 1 }
