module example.invalid/cunicu-signal-interop

// Go 1.25, the oldest Go that the project's scripts/test accepts, keeps grpc at v1.84
// and x/crypto at v0.55 (their next releases need Go 1.26).
go 1.25.0

require (
	golang.org/x/crypto v0.55.0
	google.golang.org/grpc v1.84.0
	google.golang.org/protobuf v1.36.12
)

require (
	golang.org/x/net v0.58.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
	golang.org/x/text v0.41.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260817212433-ac3dfec99bb1 // indirect
)
