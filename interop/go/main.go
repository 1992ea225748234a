// Command interop speaks cunīcu's signaling protocol with the Go libraries that cunīcu
// itself uses: google.golang.org/grpc for gRPC and golang.org/x/crypto/nacl/box for the
// envelopes. It has no generated code: the protobuf descriptors come from a
// FileDescriptorSet file (the Rust side writes cunicu_signal::proto::FILE_DESCRIPTOR_SET),
// and every message is a dynamicpb.Message.
//
// The Rust integration test crates/server/tests/interop_go.rs builds and runs it.
//
// Subcommands:
//
//	interop subscribe --descriptors F --server HOST:PORT --key-file K [--count N]
//	interop publish   --descriptors F --server HOST:PORT --key-file K --to PUBKEY --json MESSAGE
//	interop publish-raw   --descriptors F --server HOST:PORT --sender B64 --recipient B64 [--body B64] [--nonce B64]
//	interop subscribe-raw --descriptors F --server HOST:PORT --key B64
//	interop build-info    --descriptors F --server HOST:PORT
//	interop serve     --descriptors F [--listen 127.0.0.1:0]
//	interop genkey | interop pubkey < private
//
// Output on stdout, one line each: "READY" once a subscription is confirmed by the
// server's empty sync envelope; one JSON object per message received; "OK" after a
// publish; "LISTENING HOST:PORT" when the server is up. A gRPC error is printed as
// "ERROR <code> <message>" on stdout and the exit status is 1; other failures go to
// stderr with exit status 2.
package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/crypto/curve25519"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

const (
	keyLen   = 32
	nonceLen = 24

	serviceName = "cunicu.signaling.Signaling"
)

// schema holds the message descriptors the program needs, loaded at run time.
type schema struct {
	files *protoregistry.Files

	envelope         protoreflect.MessageDescriptor
	encryptedMessage protoreflect.MessageDescriptor
	message          protoreflect.MessageDescriptor
	subscribeParams  protoreflect.MessageDescriptor
	empty            protoreflect.MessageDescriptor
	buildInfo        protoreflect.MessageDescriptor
}

func loadSchema(path string) (*schema, error) {
	if path == "" {
		return nil, errors.New("--descriptors FILE is required")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(raw, &set); err != nil {
		return nil, fmt.Errorf("%s: not a FileDescriptorSet: %w", path, err)
	}
	files, err := protodesc.NewFiles(&set)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s := &schema{files: files}
	for name, dst := range map[string]*protoreflect.MessageDescriptor{
		"cunicu.signaling.Envelope":         &s.envelope,
		"cunicu.signaling.EncryptedMessage": &s.encryptedMessage,
		"cunicu.signaling.Message":          &s.message,
		"cunicu.signaling.SubscribeParams":  &s.subscribeParams,
		"cunicu.Empty":                      &s.empty,
		"cunicu.BuildInfo":                  &s.buildInfo,
	} {
		d, err := files.FindDescriptorByName(protoreflect.FullName(name))
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", path, name, err)
		}
		md, ok := d.(protoreflect.MessageDescriptor)
		if !ok {
			return nil, fmt.Errorf("%s: %s is not a message", path, name)
		}
		*dst = md
	}
	sd, err := files.FindDescriptorByName(serviceName)
	if err != nil {
		return nil, fmt.Errorf("%s: %s: %w", path, serviceName, err)
	}
	if _, ok := sd.(protoreflect.ServiceDescriptor); !ok {
		return nil, fmt.Errorf("%s: %s is not a service", path, serviceName)
	}
	return s, nil
}

func (s *schema) newEnvelope() *dynamicpb.Message { return dynamicpb.NewMessage(s.envelope) }
func (s *schema) newMessage() *dynamicpb.Message  { return dynamicpb.NewMessage(s.message) }

// field returns the descriptor of a field that the wire contract (docs/PROTOCOL.md §5) guarantees.
func field(md protoreflect.MessageDescriptor, name string) protoreflect.FieldDescriptor {
	fd := md.Fields().ByName(protoreflect.Name(name))
	if fd == nil {
		panic(fmt.Sprintf("%s has no field %s", md.FullName(), name))
	}
	return fd
}

func getBytes(m protoreflect.Message, name string) []byte {
	return m.Get(field(m.Descriptor(), name)).Bytes()
}

func setBytes(m protoreflect.Message, name string, b []byte) {
	m.Set(field(m.Descriptor(), name), protoreflect.ValueOfBytes(b))
}

// envelopeParts reads sender, recipient, body and nonce of an Envelope.
func envelopeParts(env *dynamicpb.Message) (sender, recipient, body, nonce []byte, hasContents bool) {
	sender = getBytes(env, "sender")
	recipient = getBytes(env, "recipient")
	contentsFd := field(env.Descriptor(), "contents")
	hasContents = env.Has(contentsFd)
	contents := env.Get(contentsFd).Message()
	return sender, recipient, getBytes(contents, "body"), getBytes(contents, "nonce"), hasContents
}

// buildEnvelope makes an Envelope{sender, recipient, contents{body, nonce}}.
func (s *schema) buildEnvelope(sender, recipient, body, nonce []byte) *dynamicpb.Message {
	env := s.newEnvelope()
	setBytes(env, "sender", sender)
	setBytes(env, "recipient", recipient)
	contents := dynamicpb.NewMessage(s.encryptedMessage)
	setBytes(contents, "body", body)
	setBytes(contents, "nonce", nonce)
	env.Set(field(s.envelope, "contents"), protoreflect.ValueOfMessage(contents))
	return env
}

// Keys in WireGuard's text form: standard base64 of 32 bytes.

func parseKey(text string) (*[keyLen]byte, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return nil, fmt.Errorf("key is not base64: %w", err)
	}
	if len(raw) != keyLen {
		return nil, fmt.Errorf("key is %d bytes, expected %d", len(raw), keyLen)
	}
	var k [keyLen]byte
	copy(k[:], raw)
	return &k, nil
}

func readKeyFile(path string) (*[keyLen]byte, error) {
	if path == "" {
		return nil, errors.New("--key-file FILE is required")
	}
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := parseKey(string(text))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// publicKey is X25519(private, basepoint 9); X25519 clamps the scalar itself.
func publicKey(private *[keyLen]byte) *[keyLen]byte {
	pub, err := curve25519.X25519(private[:], curve25519.Basepoint)
	if err != nil {
		// Only a low-order point can make X25519 fail, and the basepoint is not one.
		panic(err)
	}
	var k [keyLen]byte
	copy(k[:], pub)
	return &k
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// fail reports err and exits: gRPC errors as "ERROR <code> <message>" on stdout with
// status 1, anything else on stderr with status 2.
func fail(err error) {
	if st, ok := status.FromError(err); ok {
		fmt.Printf("ERROR %s %s\n", st.Code(), st.Message())
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "interop: %v\n", err)
	os.Exit(2)
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: interop COMMAND [flags]
commands: subscribe, publish, subscribe-raw, publish-raw, build-info, serve, genkey, pubkey
run "interop COMMAND -h" for the flags of a command
`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmd, args := os.Args[1], os.Args[2:]
	var err error
	switch cmd {
	case "subscribe":
		err = cmdSubscribe(args)
	case "publish":
		err = cmdPublish(args)
	case "subscribe-raw":
		err = cmdSubscribeRaw(args)
	case "publish-raw":
		err = cmdPublishRaw(args)
	case "build-info":
		err = cmdBuildInfo(args)
	case "serve":
		err = cmdServe(args)
	case "genkey":
		var k [keyLen]byte
		if _, err = rand.Read(k[:]); err == nil {
			fmt.Println(b64(k[:]))
		}
	case "pubkey":
		var text []byte
		if text, err = io.ReadAll(os.Stdin); err == nil {
			var k *[keyLen]byte
			if k, err = parseKey(string(text)); err == nil {
				fmt.Println(b64(publicKey(k)[:]))
			}
		}
	default:
		usage()
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fail(err)
	}
}
