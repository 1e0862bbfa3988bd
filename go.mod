module github.com/batchq/batchq

go 1.26

require (
	github.com/alicebob/miniredis/v2 v2.40.0
	github.com/oklog/run v1.2.0
	github.com/redis/rueidis v1.0.79
	go.uber.org/goleak v1.3.0
	go.uber.org/zap v1.28.0
)

require (
	github.com/yuin/gopher-lua v1.1.1 // indirect
	go.uber.org/multierr v1.10.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
