// fcvm probe guest: a tiny x86_64 "kernel" booted by Firecracker.
//
// Why it is shaped like this:
//
// * On the KVM we run under (nested PVM) guest ring 0 is emulated one
//   instruction at a time (~1.5 M insn/s) and the emulator rejects many
//   instructions. Guest ring 3 runs natively. So ring 0 does only what needs
//   privilege (descriptor tables, paging, APIC, port I/O) with plain
//   mov/add/cmp/jmp/in/out/wrmsr/hlt/iretq, and everything heavy (filling,
//   verifying, hashing, number formatting) runs in ring 3.
// * Port I/O from ring 3 raises #GP even with IOPL=3 there, so ring 3 asks
//   ring 0 through `int 0x80` for serial output, tick waits, the i8042 poll
//   and the reset. Under PVM `int 0x80` from ring 3 arrives as #UD (and
//   `syscall` enters LSTAR without leaving user mode), so the #UD handler
//   recognises the `cd 80` bytes and dispatches the call; on a plain KVM
//   host the DPL-3 gate at vector 0x80 is taken directly.
// * All state (tick number, generations, boot id) lives in guest memory, so a
//   VM restored from a snapshot continues exactly where it was.
//
// Output is one line per event on the serial port (COM1), '\n' terminated;
// see README.md for the exact format and the checksum definition, which the
// host-side model in src/model.rs reproduces bit for bit.
//
// Assembled with `cc -c` (C preprocessor for `//` comments), linked with
// src/probe.ld. Intel syntax.

        .intel_syntax noprefix

// ---------------------------------------------------------------------------
// Layout constants. They must match the windows in probe.ld (it asserts them).
// ---------------------------------------------------------------------------
        .equ KERNEL_BASE,   0x100000    // ring-0 code and data
        .equ USER_BASE,     0x110000    // ring-3 code, data and stack
        .equ KBSS_BASE,     0x130000    // ring-0 bss (stack, page directories)
        .equ FILL_BASE,     0x200000    // first byte of RAM the fill may use
        .equ MAX_PHYS_GIB,  64          // page directories reserved in kbss
        .equ MAX_PHYS,      MAX_PHYS_GIB << 30

// Page table entry bits. Accessed/Dirty are preset so the CPU (or the
// emulator standing in for it) never has to write back into the tables.
        .equ PTE_P,   0x01
        .equ PTE_W,   0x02
        .equ PTE_U,   0x04
        .equ PTE_A,   0x20
        .equ PTE_D,   0x40
        .equ PTE_PS,  0x80
        .equ PTE_KERNEL, PTE_P | PTE_W | PTE_A | PTE_D
        .equ PTE_USER_RW, PTE_P | PTE_W | PTE_U | PTE_A | PTE_D
        .equ PTE_USER_RO, PTE_P | PTE_U | PTE_A
        .equ PDE_TABLE, PTE_P | PTE_W | PTE_U | PTE_A
        .equ PDE_2M_USER, PTE_P | PTE_W | PTE_U | PTE_A | PTE_D | PTE_PS

// GDT selectors. The kernel code/data selectors equal the ones Firecracker's
// own boot GDT uses (0x08/0x10), so switching GDTs needs no far jump.
        .equ SEL_KCODE, 0x08
        .equ SEL_KDATA, 0x10
        .equ SEL_UDATA, 0x18 | 3
        .equ SEL_UCODE, 0x20 | 3
        .equ SEL_TSS,   0x28

// Linux boot_params ("zero page") offsets filled in by Firecracker.
        .equ BP_E820_ENTRIES, 0x1e8     // u8
        .equ BP_CMD_LINE_PTR, 0x228     // u32
        .equ BP_E820_TABLE,   0x2d0     // 20-byte entries: addr u64, size u64, type u32
        .equ E820_RAM,        1
        .equ E820_MAX,        128

// Devices.
        .equ COM1,          0x3f8
        .equ I8042_DATA,    0x60
        .equ I8042_STATUS,  0x64
        .equ I8042_OBF,     0x01        // output buffer full
        .equ I8042_RESET,   0xfe        // pulse reset line: Firecracker exits 0
        .equ PIC1_DATA,     0x21
        .equ PIC2_DATA,     0xa1

// x2APIC MSRs.
        .equ MSR_APIC_BASE, 0x1b
        .equ APIC_BASE_EN_X2, 0xc00     // EN | EXTD
        .equ MSR_X2_EOI,    0x80b
        .equ MSR_X2_SVR,    0x80f
        .equ MSR_X2_LVT_TIMER, 0x832
        .equ MSR_X2_LVT_LINT0, 0x835
        .equ MSR_X2_TMICT,  0x838       // initial count
        .equ MSR_X2_TMCCT,  0x839       // current count
        .equ MSR_X2_TDCR,   0x83e       // divide configuration
        .equ APIC_DIV_16,   0x3
        .equ LVT_MASKED,    0x10000
        .equ LVT_PERIODIC,  0x20000

// Interrupt vectors.
        .equ VEC_UD,       6
        .equ VEC_TIMER,    0x20
        .equ VEC_SYSCALL,  0x80
        .equ VEC_SPURIOUS, 0xff

// Syscalls (`int 0x80`, number in rax, args in rdi/rsi, result in rax;
// rcx, rdx, rsi, rdi, r8-r11 are clobbered like a normal call).
        .equ SYS_WRITE,     0   // rdi=buf, rsi=len: bytes to COM1
        .equ SYS_WAIT,      1   // rdi=last timer count seen; returns new count
        .equ SYS_KBD,       2   // drain i8042; returns number of bytes read
        .equ SYS_RESET,     3   // i8042 reset, never returns
        .equ SYS_TIMER,     4   // rdi=initial count, rsi=LVT timer value (divide 16)
        .equ SYS_TIMER_NOW, 5   // returns the APIC timer current count

// Timer: KVM's local APIC runs its timer from a 1 GHz bus clock; divided by
// 16 that is 62,500 counts per millisecond and a 32-bit counter lasts 68 s.
        .equ APIC_COUNTS_PER_MS, 62500
        .equ TICK_MS_MAX, 60000

// Pattern constants (mirrored in src/model.rs).
        .equ PAGE_WORDS, 512
        .equ HEADER_WORDS, 3
        .equ ERRORS_PER_TICK, 8
        .equ MAX_RANGES, 8
        .equ CMDLINE_MAX, 4096

// splitmix64 finaliser: z is mixed in place, t is scratch.
.macro MIX64 z, t
        mov     \t, \z
        shr     \t, 30
        xor     \z, \t
        movabs  \t, 0xbf58476d1ce4e5b9
        imul    \z, \t
        mov     \t, \z
        shr     \t, 27
        xor     \z, \t
        movabs  \t, 0x94d049bb133111eb
        imul    \z, \t
        mov     \t, \z
        shr     \t, 31
        xor     \z, \t
.endm

// xorshift64 (13, 7, 17) step: x advanced in place, t is scratch.
.macro XORSHIFT x, t
        mov     \t, \x
        shl     \t, 13
        xor     \x, \t
        mov     \t, \x
        shr     \t, 7
        xor     \x, \t
        mov     \t, \x
        shl     \t, 17
        xor     \x, \t
.endm

// Per-page stream seed: x = mix64(seed ^ i*K1 ^ g*K2), and 0 maps to MAGIC
// because xorshift would stay at zero forever. Clobbers t1, t2.
.macro PAGE_SEED x, i, g, t1, t2
        mov     \x, \i
        movabs  \t1, 0x9e3779b97f4a7c15
        imul    \x, \t1
        mov     \t2, \g
        movabs  \t1, 0xd1b54a32d192ed03
        imul    \t2, \t1
        xor     \x, \t2
        xor     \x, [u_seed]
        MIX64   \x, \t1
        test    \x, \x
        jnz     98f
        movabs  \x, 0x31475045424f5250
98:
.endm

        .equ PAGE_MAGIC_LO, 0x424f5250  // "PROB"
        .equ PAGE_MAGIC_HI, 0x31475045  // "EPG1"

// ===========================================================================
// Ring 0
// ===========================================================================

        .section .text.entry, "ax", @progbits
        .code64
        .globl _start
// Firecracker enters here in long mode with rsi = boot_params (0x7000),
// interrupts off, its own GDT at 0x500 and identity tables at cr3 = 0x9000.
_start:
        cli
        mov     rsp, OFFSET kstack_top
        mov     r15, rsi                        // keep boot_params for ring 3

        lgdt    [gdt_ptr]
        mov     ax, SEL_KDATA
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        xor     eax, eax
        mov     fs, ax
        mov     gs, ax
        mov     ax, SEL_TSS
        ltr     ax
        lidt    [idt_ptr]

        // Page directory 0 entry 0 points at pt0 (the static 4 KiB map of the
        // first 2 MiB); kbss is zero, so every other entry starts not-present.
        mov     rax, OFFSET pt0 + PDE_TABLE
        mov     [pd_pages], rax

        // Map each e820 RAM range at or above FILL_BASE with user-accessible
        // 2 MiB pages. The MMIO gap is not RAM in e820, so it stays unmapped.
        movzx   ecx, BYTE PTR [r15 + BP_E820_ENTRIES]
        cmp     ecx, E820_MAX
        jbe     1f
        mov     ecx, E820_MAX
1:      lea     rsi, [r15 + BP_E820_TABLE]
.Le820_entry:
        test    ecx, ecx
        jz      .Le820_done
        cmp     DWORD PTR [rsi + 16], E820_RAM
        jne     .Le820_next
        mov     rax, [rsi]                      // start
        mov     rdx, [rsi + 8]
        add     rdx, rax                        // end (exclusive)
        mov     r8, MAX_PHYS
        cmp     rdx, r8
        jbe     2f
        mov     rdx, r8
2:      cmp     rax, FILL_BASE
        jae     3f
        mov     rax, FILL_BASE
3:      and     rax, -0x200000                  // round start down to 2 MiB
.Le820_chunk:
        cmp     rax, rdx
        jae     .Le820_next
        mov     r8, rax
        shr     r8, 18                          // (addr >> 21) * 8: PDE offset
        lea     r9, [rax + PDE_2M_USER]
        mov     [r8 + pd_pages], r9
        add     rax, 0x200000
        jmp     .Le820_chunk
.Le820_next:
        add     rsi, 20
        dec     ecx
        jmp     .Le820_entry
.Le820_done:
        mov     rax, OFFSET pml4
        mov     cr3, rax

        // Mask the legacy PICs: i8042 (IRQ 1) raises its line on
        // SendCtrlAltDel, and an unprogrammed PIC would deliver it as
        // vector 1 through LINT0. LINT0 is masked below as well.
        mov     al, 0xff
        out     PIC1_DATA, al
        out     PIC2_DATA, al

        // x2APIC on, software-enabled, ExtINT (LINT0) masked.
        mov     ecx, MSR_APIC_BASE
        rdmsr
        or      eax, APIC_BASE_EN_X2
        wrmsr
        xor     edx, edx
        mov     ecx, MSR_X2_SVR
        mov     eax, 0x100 | VEC_SPURIOUS
        wrmsr
        mov     ecx, MSR_X2_LVT_LINT0
        mov     eax, LVT_MASKED
        wrmsr

        // Drop to ring 3 with interrupts enabled; rdi = boot_params.
        push    SEL_UDATA
        push    OFFSET ustack_top
        push    0x202
        push    SEL_UCODE
        push    OFFSET user_entry
        mov     rdi, r15
        iretq

        .section .ktext, "ax", @progbits

// Timer interrupt: count it and acknowledge. Nothing else, it is emulated.
timer_isr:
        push    rax
        push    rcx
        push    rdx
        inc     QWORD PTR [timer_count]
        mov     ecx, MSR_X2_EOI
        xor     eax, eax
        xor     edx, edx
        wrmsr
        pop     rdx
        pop     rcx
        pop     rax
        iretq

spurious_isr:
        iretq

// #UD. A ring-3 `int 0x80` shows up here under PVM with rip at the
// instruction: step over it and treat it as the syscall. Anything else is a
// real fault. Frame: rip, cs, rflags, rsp, ss (no error code).
ud_isr:
        test    BYTE PTR [rsp + 8], 3
        jz      1f
        push    rax
        mov     rax, [rsp + 8]
        cmp     WORD PTR [rax], 0x80cd
        pop     rax
        jne     1f
        add     QWORD PTR [rsp], 2
        jmp     syscall_isr
1:      push    0
        push    VEC_UD
        jmp     fault_common

// int 0x80 from ring 3 (interrupt gate, so IF=0 on entry).
syscall_isr:
        cmp     rax, SYS_WRITE
        je      sys_write
        cmp     rax, SYS_WAIT
        je      sys_wait
        cmp     rax, SYS_KBD
        je      sys_kbd
        cmp     rax, SYS_RESET
        je      kreset
        cmp     rax, SYS_TIMER
        je      sys_timer
        cmp     rax, SYS_TIMER_NOW
        je      sys_timer_now
        mov     rax, -1
        iretq

// Byte by byte to the UART data register. Firecracker's 16550 accepts a
// write at any time (its line status always reports an empty transmitter),
// so polling LSR would only double the number of emulated port exits.
sys_write:
        mov     edx, COM1
        cmp     rsi, 1024                       // cap: one line, not a flood
        jbe     1f
        mov     esi, 1024
1:      test    rsi, rsi
        jz      2f
        mov     al, [rdi]
        out     dx, al
        inc     rdi
        dec     rsi
        jmp     1b
2:      xor     eax, eax
        iretq

// Sleep until the timer count differs from rdi. IF is 0 here; `sti; hlt`
// is atomic (sti's one-instruction shadow), so a tick cannot slip between
// the compare and the hlt.
sys_wait:
        mov     rax, [timer_count]
        cmp     rax, rdi
        jne     1f
        sti
        hlt
        cli
        jmp     sys_wait
1:      iretq

// Read the i8042 output buffer until it is empty; return the byte count.
// Bounded so a device that never clears its status cannot wedge us.
sys_kbd:
        xor     ecx, ecx
1:      in      al, I8042_STATUS
        test    al, I8042_OBF
        jz      2f
        in      al, I8042_DATA
        inc     ecx
        cmp     ecx, 64
        jb      1b
2:      mov     eax, ecx
        iretq

// Program the APIC timer: divide by 16, LVT from rsi, initial count rdi.
sys_timer:
        mov     r8, rdi
        mov     r9, rsi
        xor     edx, edx
        mov     ecx, MSR_X2_TDCR
        mov     eax, APIC_DIV_16
        wrmsr
        mov     ecx, MSR_X2_LVT_TIMER
        mov     eax, r9d
        wrmsr
        mov     ecx, MSR_X2_TMICT
        mov     eax, r8d
        wrmsr
        xor     eax, eax
        iretq

sys_timer_now:
        mov     ecx, MSR_X2_TMCCT
        rdmsr
        mov     eax, eax
        iretq

// Reset through the i8042: Firecracker treats it as a clean shutdown.
kreset:
        mov     al, I8042_RESET
        out     I8042_STATUS, al
1:      cli
        hlt
        jmp     1b

// CPU exceptions and unexpected vectors. Each stub is 16 bytes so the IDT can
// be generated with arithmetic; stubs push a dummy error code where the CPU
// does not push one, then the vector.
        .balign 16
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        push    vec
        .else
        push    0
        push    vec
        .endif
        jmp     fault_common
        .set vec, vec + 1
        .endr

// Stack: vector, error code, rip, cs, rflags, rsp, ss.
fault_common:
        lea     rsi, [kmsg_fault]
        call    kputz
        mov     r8, [rsp]
        call    kput_dec
        lea     rsi, [kmsg_error]
        call    kputz
        mov     rax, [rsp + 8]
        call    kput_hex16
        lea     rsi, [kmsg_rip]
        call    kputz
        mov     rax, [rsp + 16]
        call    kput_hex16
        lea     rsi, [kmsg_cr2]
        call    kputz
        mov     rax, cr2
        call    kput_hex16
        lea     rsi, [kmsg_nl]
        call    kputz
        jmp     kreset

// Print the NUL-terminated string at rsi. Clobbers rax, rdx, rsi.
kputz:
        mov     edx, COM1
1:      mov     al, [rsi]
        test    al, al
        jz      2f
        out     dx, al
        inc     rsi
        jmp     1b
2:      ret

// Print rax as 16 hex digits. Clobbers rax, rcx, rdx, r8.
kput_hex16:
        mov     r8, rax
        mov     ecx, 16
        mov     edx, COM1
1:      rol     r8, 4
        mov     al, r8b
        and     al, 15
        cmp     al, 10
        jb      2f
        add     al, 39                          // 'a' - '0' - 10
2:      add     al, 48                          // '0'
        out     dx, al
        dec     ecx
        jnz     1b
        ret

// Print r8 (< 1000) in decimal, by repeated subtraction rather than div.
// Clobbers rax, rcx, rdx, r8, r9.
kput_dec:
        mov     edx, COM1
        xor     r9d, r9d                        // 1 once a digit was printed
        mov     ecx, 100
        call    2f
        mov     ecx, 10
        call    2f
        mov     al, r8b
        add     al, 48
        out     dx, al
        ret
2:      xor     eax, eax
3:      cmp     r8, rcx
        jb      4f
        sub     r8, rcx
        inc     eax
        jmp     3b
4:      test    eax, eax
        jnz     5f
        test    r9d, r9d
        jz      6f
5:      add     al, 48
        out     dx, al
        mov     r9d, 1
6:      ret

// ---------------------------------------------------------------------------
// Ring-0 data
// ---------------------------------------------------------------------------
        .section .kdata, "aw", @progbits
        .balign 8
gdt:
        .quad   0                               // null
        .quad   0x00af9b000000ffff              // 0x08 kernel code, 64-bit
        .quad   0x00cf93000000ffff              // 0x10 kernel data
        .quad   0x00cff3000000ffff              // 0x18 user data
        .quad   0x00affb000000ffff              // 0x20 user code, 64-bit
        // 0x28: 64-bit TSS descriptor. The base is split over several
        // fields; tss lives in the kernel window, so base[31:16] is 0x0010.
        .word   tss_end - tss - 1               // limit
        .word   tss - KERNEL_BASE               // base[15:0]
        .byte   0x10                            // base[23:16]
        .byte   0x89                            // present, available 64-bit TSS
        .byte   0                               // limit[19:16], flags
        .byte   0                               // base[31:24]
        .long   0                               // base[63:32]
        .long   0
gdt_end:

        .balign 8
        .word   0
        .word   0
        .word   0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt

        .balign 8
        .word   0
        .word   0
        .word   0
idt_ptr:
        .word   idt_end - idt - 1
        .quad   idt

        .balign 16
tss:
        .long   0
        .quad   kstack_top                      // rsp0: stack for ring3 -> ring0
        .quad   0                               // rsp1
        .quad   0                               // rsp2
        .quad   0
        .rept 7
        .quad   0                               // ist1..7
        .endr
        .quad   0
        .word   0
        .word   tss_end - tss                   // I/O bitmap offset: none
tss_end:

// Interrupt gate: offset[15:0] is `handler - KERNEL_BASE` (the linker errors
// out if it does not fit 16 bits), offset[31:16] is 0x0010.
.macro GATE target, dpl
        .word   \target - KERNEL_BASE
        .word   SEL_KCODE
        .byte   0
        .byte   0x8e | (\dpl << 5)
        .word   0x0010
        .long   0
        .long   0
.endm

        .balign 16
idt:
        .set vec, 0
        .rept 256
        .if vec == VEC_TIMER
        GATE    timer_isr, 0
        .elseif vec == VEC_SYSCALL
        GATE    syscall_isr, 3
        .elseif vec == VEC_UD
        GATE    ud_isr, 0
        .elseif vec == VEC_SPURIOUS
        GATE    spurious_isr, 0
        .else
        GATE    (isr_stubs+vec*16), 0
        .endif
        .set vec, vec + 1
        .endr
idt_end:

        .balign 8
timer_count:
        .quad   0

kmsg_fault:  .asciz "PROBE FAULT vector="
kmsg_error:  .asciz " error="
kmsg_rip:    .asciz " rip="
kmsg_cr2:    .asciz " cr2="
kmsg_nl:     .asciz "\n"

// Page tables. pml4 -> pdpt -> 64 page directories (kbss, filled at boot
// from e820 with 2 MiB pages) and pt0, a static 4 KiB map of the first
// 2 MiB that keeps the kernel windows supervisor-only:
//   page 0                   not present (null pointer guard)
//   0x001000 - 0x0fffff      user read-only (zero page, command line)
//   0x100000 - 0x10ffff      kernel
//   0x110000 - 0x12ffff      user read-write
//   0x130000 - 0x1fffff      kernel
        .balign 4096
pml4:
        .quad   pdpt + PDE_TABLE
        .fill   511, 8, 0

        .balign 4096
pdpt:
        .set gib, 0
        .rept MAX_PHYS_GIB
        .quad   pd_pages + gib * 4096 + PDE_TABLE
        .set gib, gib + 1
        .endr
        .fill   512 - MAX_PHYS_GIB, 8, 0

        .balign 4096
pt0:
        .set pg, 0
        .rept 512
        .if pg == 0
        .quad   0
        .elseif (pg << 12) < KERNEL_BASE
        .quad   (pg << 12) | PTE_USER_RO
        .elseif (pg << 12) < USER_BASE
        .quad   (pg << 12) | PTE_KERNEL
        .elseif (pg << 12) < KBSS_BASE
        .quad   (pg << 12) | PTE_USER_RW
        .else
        .quad   (pg << 12) | PTE_KERNEL
        .endif
        .set pg, pg + 1
        .endr

        .section .kbss, "aw", @nobits
        .balign 4096
kstack:
        .skip   16384
kstack_top:
        .balign 4096
pd_pages:
        .skip   MAX_PHYS_GIB * 4096

// ===========================================================================
// Ring 3
// ===========================================================================
// Internal calling convention: System V (args rdi, rsi, rdx; result rax;
// rbx, rbp, r12-r15 preserved) unless a routine says otherwise.

        .section .utext, "ax", @progbits

// rdi = boot_params (user read-only mapping).
user_entry:
        mov     [u_bootp], rdi
        call    parse_cmdline
        call    parse_e820
        call    size_region
        call    make_boot_id
        call    print_banner

        // Time the fill with the APIC timer as a one-shot stopwatch.
        mov     eax, SYS_TIMER
        mov     edi, 0xffffffff
        mov     esi, VEC_TIMER
        int     0x80
        mov     eax, SYS_TIMER_NOW
        int     0x80
        mov     [u_t0], rax

        call    fill
        mov     [u_checksum], rax

        mov     eax, SYS_TIMER_NOW
        int     0x80
        mov     rcx, [u_t0]
        sub     rcx, rax
        mov     rax, rcx
        shl     rax, 4                          // counts at bus/16 -> ns
        xor     edx, edx
        mov     ecx, 1000000
        div     rcx
        mov     [u_fill_ms], rax
        call    print_filled

        // Periodic tick.
        mov     rdi, [u_tick_ms]
        imul    rdi, rdi, APIC_COUNTS_PER_MS
        mov     eax, SYS_TIMER
        mov     esi, VEC_TIMER | LVT_PERIODIC
        int     0x80

.Ltick_loop:
        mov     eax, SYS_WAIT
        mov     rdi, [u_timer_seen]
        int     0x80
        mov     [u_timer_seen], rax
        inc     QWORD PTR [u_tick]

        mov     eax, SYS_KBD
        int     0x80
        test    rax, rax
        jz      1f
        lea     rdi, [u_reason_cad]
        call    shutdown
1:
        call    dirty
        call    verify
        mov     [u_checksum], rax
        call    print_tick

        // probe.fault_after: crash on purpose (a ring-3 write to the
        // supervisor-only kernel window) so hosts can test guest faults.
        mov     rax, [u_fault_after]
        test    rax, rax
        jz      2f
        cmp     [u_tick], rax
        jb      2f
        mov     QWORD PTR [KERNEL_BASE], rax
2:
        mov     rax, [u_exit_after]
        test    rax, rax
        jz      .Ltick_loop
        cmp     [u_tick], rax
        jb      .Ltick_loop
        lea     rdi, [u_reason_exit]
        call    shutdown

// rdi = reason string. Prints SHUTDOWN and resets; never returns.
shutdown:
        push    rdi
        call    ln_reset
        lea     rdi, [u_s_shutdown]
        call    ln_str
        pop     rdi
        call    ln_str
        lea     rdi, [u_s_n]
        mov     rsi, [u_tick]
        call    ln_kdec
        call    ln_flush
        mov     eax, SYS_RESET
        int     0x80
1:      jmp     1b

// ---------------------------------------------------------------------------
// Command line: copy it (bounded) into u_cmdline, then scan whitespace-
// separated tokens for `probe.<key>=<decimal>`. Unknown tokens, and values
// that are empty, non-numeric or overflow u64, are ignored.
// ---------------------------------------------------------------------------
parse_cmdline:
        push    rbx
        push    r12
        push    r13
        mov     rax, [u_bootp]
        mov     esi, DWORD PTR [rax + BP_CMD_LINE_PTR]
        test    rsi, rsi
        jz      .Lpc_done
        // Only the low 1 MiB is mapped user-readable.
        lea     rdx, [rsi + CMDLINE_MAX]
        cmp     rdx, KERNEL_BASE
        jbe     1f
        mov     edx, KERNEL_BASE
1:      lea     rdi, [u_cmdline]
        xor     ecx, ecx
2:      cmp     rsi, rdx
        jae     3f
        cmp     ecx, CMDLINE_MAX - 1
        jae     3f
        mov     al, [rsi]
        test    al, al
        jz      3f
        mov     [rdi + rcx], al
        inc     rsi
        inc     ecx
        jmp     2b
3:      mov     BYTE PTR [rdi + rcx], 0

        lea     rbx, [u_cmdline]                // cursor
.Lpc_token:
        mov     al, [rbx]
        test    al, al
        jz      .Lpc_done
        cmp     al, 32
        ja      .Lpc_try
        inc     rbx
        jmp     .Lpc_token
.Lpc_try:
        lea     r12, [u_keytab]
.Lpc_key:
        mov     rdi, [r12]                      // key prefix
        test    rdi, rdi
        jz      .Lpc_skip
        mov     rsi, rbx
        call    match_prefix                    // rax = value start or 0
        test    rax, rax
        jz      .Lpc_nextkey
        mov     rdi, rax
        call    parse_dec                       // rax value, rdx ok
        test    rdx, rdx
        jz      .Lpc_skip
        mov     r13, [r12 + 8]
        mov     [r13], rax
        jmp     .Lpc_skip
.Lpc_nextkey:
        add     r12, 16
        jmp     .Lpc_key
.Lpc_skip:
        mov     al, [rbx]
        test    al, al
        jz      .Lpc_done
        cmp     al, 32
        jbe     .Lpc_token
        inc     rbx
        jmp     .Lpc_skip
.Lpc_done:
        pop     r13
        pop     r12
        pop     rbx
        ret

// rsi = text, rdi = NUL-terminated prefix. Returns rax = text after the
// prefix, or 0 if the text does not start with it.
match_prefix:
1:      mov     al, [rdi]
        test    al, al
        jz      2f
        cmp     al, [rsi]
        jne     3f
        inc     rdi
        inc     rsi
        jmp     1b
2:      mov     rax, rsi
        ret
3:      xor     eax, eax
        ret

// rdi = text. Decimal u64 terminated by NUL or whitespace.
// Returns rax = value, rdx = 1 if valid (>= 1 digit, no overflow), else 0.
parse_dec:
        xor     eax, eax
        xor     r8d, r8d                        // digit count
        mov     ecx, 10
1:      movzx   r9d, BYTE PTR [rdi]
        cmp     r9d, 32
        jbe     3f
        sub     r9d, 48
        cmp     r9d, 9
        ja      4f
        mul     rcx                             // rdx:rax = rax * 10
        jc      4f
        add     rax, r9
        jc      4f
        inc     r8
        inc     rdi
        jmp     1b
3:      xor     edx, edx
        test    r8, r8
        setnz   dl
        ret
4:      xor     edx, edx
        ret

// ---------------------------------------------------------------------------
// e820: total RAM, and the RAM ranges usable for the fill (at or above
// FILL_BASE, below MAX_PHYS, trimmed to whole 4 KiB pages), in table order.
// ---------------------------------------------------------------------------
parse_e820:
        mov     r8, [u_bootp]
        movzx   ecx, BYTE PTR [r8 + BP_E820_ENTRIES]
        cmp     ecx, E820_MAX
        jbe     1f
        mov     ecx, E820_MAX
1:      lea     rsi, [r8 + BP_E820_TABLE]
        xor     r9d, r9d                        // ram bytes
        xor     r10d, r10d                      // range count
        lea     r11, [u_ranges]
.Lpe_entry:
        test    ecx, ecx
        jz      .Lpe_done
        cmp     DWORD PTR [rsi + 16], E820_RAM
        jne     .Lpe_next
        mov     rax, [rsi]                      // start
        mov     rdx, [rsi + 8]                  // size
        add     r9, rdx
        add     rdx, rax                        // end
        cmp     rax, FILL_BASE
        jae     2f
        mov     eax, FILL_BASE
2:      mov     rdi, MAX_PHYS
        cmp     rdx, rdi
        jbe     3f
        mov     rdx, rdi
3:      add     rax, 4095
        and     rax, -4096
        and     rdx, -4096
        cmp     rax, rdx
        jae     .Lpe_next
        cmp     r10, MAX_RANGES
        jae     .Lpe_next
        sub     rdx, rax
        shr     rdx, 12
        mov     [r11], rax                      // start address
        mov     [r11 + 8], rdx                  // pages
        add     r11, 16
        inc     r10
.Lpe_next:
        add     rsi, 20
        dec     ecx
        jmp     .Lpe_entry
.Lpe_done:
        mov     [u_ram_bytes], r9
        mov     [u_nranges], r10
        ret

// Effective parameters: clamp the fill to whole MiB of available RAM, bound
// tick_ms, and derive the verification window.
size_region:
        xor     eax, eax
        mov     rcx, [u_nranges]
        lea     rdx, [u_ranges]
1:      test    rcx, rcx
        jz      2f
        add     rax, [rdx + 8]
        add     rdx, 16
        dec     rcx
        jmp     1b
2:      shr     rax, 8                          // pages -> whole MiB
        mov     [u_avail_mib], rax
        mov     rcx, [u_mem_req]
        mov     [u_mem_mib], rcx
        cmp     rcx, rax
        jbe     3f
        mov     [u_mem_mib], rax
3:      mov     rax, [u_mem_mib]
        shl     rax, 8
        mov     [u_npages], rax
        jnz     4f
        mov     QWORD PTR [u_dirty], 0          // nothing to dirty
4:      mov     rcx, [u_verify]
        test    rcx, rcx
        jz      5f
        cmp     rcx, rax
        jbe     6f
5:      mov     [u_verify], rax
6:      mov     rax, [u_tick_ms]
        test    rax, rax
        jnz     7f
        mov     eax, 1
7:      cmp     rax, TICK_MS_MAX
        jbe     8f
        mov     eax, TICK_MS_MAX
8:      mov     [u_tick_ms], rax
        mov     rax, [u_ram_bytes]
        add     rax, 0xfffff
        shr     rax, 20
        mov     [u_ram_mib], rax
        ret

// Boot id: rdrand when CPUID offers it and it delivers (it runs natively in
// ring 3), always mixed with the TSC; the TSC alone otherwise.
make_boot_id:
        push    rbx
        mov     eax, 1
        cpuid
        xor     r8d, r8d                        // random value
        xor     r9d, r9d                        // 1 if rdrand worked
        bt      ecx, 30
        jnc     2f
        mov     r10d, 32
1:      rdrand  rax
        jc      3f
        dec     r10d
        jnz     1b
        jmp     2f
3:      mov     r8, rax
        mov     r9d, 1
2:      rdtsc
        shl     rdx, 32
        or      rax, rdx
        MIX64   rax, rcx
        xor     rax, r8
        jnz     4f
        mov     eax, 1
4:      mov     [u_boot_id], rax
        mov     [u_id_rdrand], r9
        pop     rbx
        ret

// ---------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------

// rdi = page index. Returns rax = its address. Clobbers rcx, rdx, rdi.
page_addr:
        lea     rcx, [u_ranges]
        mov     rdx, [u_nranges]
1:      test    rdx, rdx
        jz      3f
        cmp     rdi, [rcx + 8]
        jb      2f
        sub     rdi, [rcx + 8]
        add     rcx, 16
        dec     rdx
        jmp     1b
2:      mov     rax, rdi
        shl     rax, 12
        add     rax, [rcx]
        ret
3:      xor     eax, eax                        // unreachable: faults loudly
        ret

// rdi = page index i, rsi = generation g. Writes the page and returns
// rax = wrapping sum of its 512 words.
// Clobbers rcx, rdx, rdi, rsi, r8-r11.
write_page:
        mov     r8, rdi
        mov     r9, rsi
        call    page_addr
        mov     rdi, rax
        PAGE_SEED rcx, r8, r9, rdx, r10
        mov     eax, PAGE_MAGIC_HI
        shl     rax, 32
        or      rax, PAGE_MAGIC_LO
        mov     [rdi], rax
        mov     [rdi + 8], r8
        mov     [rdi + 16], r9
        lea     r11, [rax + r8]
        add     r11, r9
        mov     esi, HEADER_WORDS
1:      XORSHIFT rcx, rdx
        mov     [rdi + rsi * 8], rcx
        add     r11, rcx
        inc     esi
        cmp     esi, PAGE_WORDS
        jb      1b
        mov     rax, r11
        ret

// rdi = page index i, rsi = expected generation g. Compares every word with
// the expected pattern. Returns rax = wrapping sum of the words as found and
// rdx = 1 if any word differs (first difference in u_err_*), else 0.
// Clobbers rcx, rsi, rdi, r8-r11.
verify_page:
        mov     r8, rdi
        mov     r9, rsi
        call    page_addr
        mov     rdi, rax
        PAGE_SEED rcx, r8, r9, rdx, r10
        xor     r10d, r10d                      // bad flag
        xor     r11d, r11d                      // sum
        // Header: magic, index, generation.
        mov     esi, PAGE_MAGIC_HI
        shl     rsi, 32
        or      rsi, PAGE_MAGIC_LO
        xor     edx, edx
        mov     rax, [rdi]
        add     r11, rax
        cmp     rax, rsi
        je      1f
        call    .Lvp_record
1:      mov     edx, 1
        mov     rax, [rdi + 8]
        add     r11, rax
        cmp     rax, r8
        je      2f
        mov     rsi, r8
        call    .Lvp_record
2:      mov     edx, 2
        mov     rax, [rdi + 16]
        add     r11, rax
        cmp     rax, r9
        je      3f
        mov     rsi, r9
        call    .Lvp_record
3:      mov     edx, HEADER_WORDS
.Lvp_word:
        XORSHIFT rcx, rsi
        mov     rax, [rdi + rdx * 8]
        add     r11, rax
        cmp     rax, rcx
        jne     .Lvp_bad
.Lvp_next:
        inc     edx
        cmp     edx, PAGE_WORDS
        jb      .Lvp_word
        mov     rax, r11
        mov     rdx, r10
        ret
.Lvp_bad:
        mov     rsi, rcx
        call    .Lvp_record
        jmp     .Lvp_next
// rdx = word index, rsi = expected, rax = found. Keeps the first only.
.Lvp_record:
        test    r10, r10
        jnz     1f
        mov     r10d, 1
        mov     [u_err_word], rdx
        mov     [u_err_exp], rsi
        mov     [u_err_found], rax
1:      ret

// Fill every page with generation 1. Returns rax = checksum.
fill:
        push    rbx
        push    r12
        xor     ebx, ebx                        // i
        xor     r12d, r12d                      // checksum
1:      cmp     rbx, [u_npages]
        jae     2f
        mov     rdi, rbx
        mov     esi, 1
        call    write_page
        MIX64   rax, rcx
        add     r12, rax
        inc     rbx
        jmp     1b
2:      mov     rax, r12
        pop     r12
        pop     rbx
        ret

// Rewrite u_dirty pages at the cursor with the next generation. Page i has
// generation 1 + wraps + (i < cursor ? 1 : 0) at all times.
dirty:
        push    rbx
        mov     rbx, [u_dirty]
1:      test    rbx, rbx
        jz      3f
        mov     rdi, [u_cursor]
        mov     rsi, [u_wraps]
        add     rsi, 2
        call    write_page
        inc     QWORD PTR [u_writes]
        mov     rax, [u_cursor]
        inc     rax
        cmp     rax, [u_npages]
        jb      2f
        xor     eax, eax
        inc     QWORD PTR [u_wraps]
2:      mov     [u_cursor], rax
        dec     rbx
        jmp     1b
3:      pop     rbx
        ret

// Verify u_verify pages starting at the rolling cursor (all pages when the
// window is the whole region, then the cursor stays 0). Prints an ERROR line
// for the first few bad pages. Returns rax = checksum of the window; sets
// u_bad.
verify:
        push    rbx
        push    r12
        push    r13
        push    r14
        push    r15
        mov     r12, [u_verify]
        mov     r13, [u_vcursor]
        xor     ebx, ebx                        // pages done
        xor     r14d, r14d                      // checksum
        xor     r15d, r15d                      // bad pages
        mov     QWORD PTR [u_errs_printed], 0
.Lv_page:
        cmp     rbx, r12
        jae     .Lv_done
        mov     rsi, [u_wraps]
        inc     rsi
        cmp     r13, [u_cursor]
        jae     1f
        inc     rsi
1:      mov     rdi, r13
        call    verify_page
        MIX64   rax, rcx
        add     r14, rax
        test    rdx, rdx
        jz      2f
        inc     r15
        mov     rdi, r13
        call    report_error
2:      inc     r13
        cmp     r13, [u_npages]
        jb      3f
        xor     r13d, r13d
3:      inc     rbx
        jmp     .Lv_page
.Lv_done:
        mov     [u_vcursor], r13
        mov     [u_bad], r15
        mov     rax, r14
        pop     r15
        pop     r14
        pop     r13
        pop     r12
        pop     rbx
        ret

// rdi = page index; details in u_err_*. At most ERRORS_PER_TICK per tick.
report_error:
        mov     rax, [u_errs_printed]
        cmp     rax, ERRORS_PER_TICK
        jae     1f
        inc     rax
        mov     [u_errs_printed], rax
        push    rdi
        call    ln_reset
        lea     rdi, [u_s_error]
        pop     rsi
        call    ln_kdec
        lea     rdi, [u_s_expected]
        mov     rsi, [u_err_exp]
        call    ln_khex
        lea     rdi, [u_s_found]
        mov     rsi, [u_err_found]
        call    ln_khex
        lea     rdi, [u_s_word]
        mov     rsi, [u_err_word]
        call    ln_kdec
        call    ln_flush
1:      ret

// ---------------------------------------------------------------------------
// Lines
// ---------------------------------------------------------------------------
print_banner:
        call    ln_reset
        lea     rdi, [u_s_banner]
        mov     rsi, [u_boot_id]
        call    ln_khex
        lea     rdi, [u_s_mem_mib]
        mov     rsi, [u_mem_mib]
        call    ln_kdec
        lea     rdi, [u_s_seed]
        mov     rsi, [u_seed]
        call    ln_kdec
        lea     rdi, [u_s_tick_ms]
        mov     rsi, [u_tick_ms]
        call    ln_kdec
        lea     rdi, [u_s_dirty]
        mov     rsi, [u_dirty]
        call    ln_kdec
        lea     rdi, [u_s_ram_mib]
        mov     rsi, [u_ram_mib]
        call    ln_kdec
        lea     rdi, [u_s_exit_after]
        mov     rsi, [u_exit_after]
        call    ln_kdec
        lea     rdi, [u_s_verify]
        mov     rsi, [u_verify]
        call    ln_kdec
        lea     rdi, [u_s_requested]
        mov     rsi, [u_mem_req]
        call    ln_kdec
        lea     rdi, [u_s_avail]
        mov     rsi, [u_avail_mib]
        call    ln_kdec
        lea     rdi, [u_s_fault_after]
        mov     rsi, [u_fault_after]
        call    ln_kdec
        lea     rdi, [u_s_id_src]
        call    ln_str
        lea     rdi, [u_s_rdtsc]
        cmp     QWORD PTR [u_id_rdrand], 0
        je      1f
        lea     rdi, [u_s_rdrand]
1:      call    ln_str
        jmp     ln_flush

print_filled:
        call    ln_reset
        lea     rdi, [u_s_filled]
        mov     rsi, [u_npages]
        call    ln_kdec
        lea     rdi, [u_s_checksum]
        mov     rsi, [u_checksum]
        call    ln_khex
        lea     rdi, [u_s_ms]
        mov     rsi, [u_fill_ms]
        call    ln_kdec
        jmp     ln_flush

print_tick:
        call    ln_reset
        lea     rdi, [u_s_tick]
        mov     rsi, [u_tick]
        call    ln_kdec
        lea     rdi, [u_s_gen]
        mov     rsi, [u_npages]
        add     rsi, [u_writes]
        call    ln_kdec
        lea     rdi, [u_s_verified]
        mov     rsi, [u_verify]
        call    ln_kdec
        lea     rdi, [u_s_bad]
        mov     rsi, [u_bad]
        call    ln_kdec
        lea     rdi, [u_s_checksum]
        mov     rsi, [u_checksum]
        call    ln_khex
        jmp     ln_flush

ln_reset:
        mov     QWORD PTR [u_len], 0
        ret

// Append NUL-terminated rdi. Clobbers rax, rcx, rdi (not rsi).
ln_str:
        mov     rcx, [u_len]
1:      mov     al, [rdi]
        test    al, al
        jz      2f
        mov     [u_line + rcx], al
        inc     rdi
        inc     rcx
        jmp     1b
2:      mov     [u_len], rcx
        ret

// rdi = key string, rsi = value.
ln_kdec:
        push    rsi
        call    ln_str
        pop     rdi
        jmp     ln_dec
ln_khex:
        push    rsi
        call    ln_str
        pop     rdi
        jmp     ln_hex16

// Append rdi in decimal.
ln_dec:
        mov     rax, rdi
        lea     r8, [u_digits + 24]
        mov     ecx, 10
        xor     r9d, r9d
1:      xor     edx, edx
        div     rcx
        add     dl, 48
        dec     r8
        mov     [r8], dl
        inc     r9
        test    rax, rax
        jnz     1b
        mov     rcx, [u_len]
2:      mov     al, [r8]
        mov     [u_line + rcx], al
        inc     r8
        inc     rcx
        dec     r9
        jnz     2b
        mov     [u_len], rcx
        ret

// Append rdi as 16 lowercase hex digits.
ln_hex16:
        mov     rcx, [u_len]
        mov     edx, 16
1:      rol     rdi, 4
        mov     eax, edi
        and     eax, 15
        cmp     eax, 10
        jb      2f
        add     eax, 39
2:      add     eax, 48
        mov     [u_line + rcx], al
        inc     rcx
        dec     edx
        jnz     1b
        mov     [u_len], rcx
        ret

// Terminate the line with '\n' and send it.
ln_flush:
        mov     rsi, [u_len]
        mov     BYTE PTR [u_line + rsi], 10
        inc     rsi
        lea     rdi, [u_line]
        mov     eax, SYS_WRITE
        int     0x80
        mov     QWORD PTR [u_len], 0
        ret

// ---------------------------------------------------------------------------
// Ring-3 data
// ---------------------------------------------------------------------------
        .section .udata, "aw", @progbits
        .balign 8
// Parameters with their defaults (overridden by the command line).
u_mem_req:      .quad 32
u_seed:         .quad 1
u_tick_ms:      .quad 200
u_dirty:        .quad 0
u_exit_after:   .quad 0
u_verify:       .quad 0
u_fault_after:  .quad 0

// Key prefix -> destination.
u_keytab:
        .quad   u_k_mem, u_mem_req
        .quad   u_k_seed, u_seed
        .quad   u_k_tick, u_tick_ms
        .quad   u_k_dirty, u_dirty
        .quad   u_k_exit, u_exit_after
        .quad   u_k_verify, u_verify
        .quad   u_k_fault, u_fault_after
        .quad   0, 0

u_k_mem:        .asciz "probe.mem_mib="
u_k_seed:       .asciz "probe.seed="
u_k_tick:       .asciz "probe.tick_ms="
u_k_dirty:      .asciz "probe.dirty_pages="
u_k_exit:       .asciz "probe.exit_after="
u_k_verify:     .asciz "probe.verify_pages="
u_k_fault:      .asciz "probe.fault_after="

u_s_banner:     .asciz "PROBE BANNER boot_id="
u_s_mem_mib:    .asciz " mem_mib="
u_s_seed:       .asciz " seed="
u_s_tick_ms:    .asciz " tick_ms="
u_s_dirty:      .asciz " dirty_pages="
u_s_ram_mib:    .asciz " ram_mib="
u_s_exit_after: .asciz " exit_after="
u_s_verify:     .asciz " verify_pages="
u_s_requested:  .asciz " requested_mib="
u_s_avail:      .asciz " avail_mib="
u_s_fault_after: .asciz " fault_after="
u_s_id_src:     .asciz " id_source="
u_s_rdrand:     .asciz "rdrand"
u_s_rdtsc:      .asciz "rdtsc"
u_s_filled:     .asciz "PROBE FILLED pages="
u_s_checksum:   .asciz " checksum="
u_s_ms:         .asciz " ms="
u_s_tick:       .asciz "PROBE TICK n="
u_s_gen:        .asciz " gen="
u_s_verified:   .asciz " verified="
u_s_bad:        .asciz " bad="
u_s_error:      .asciz "PROBE ERROR page="
u_s_expected:   .asciz " expected="
u_s_found:      .asciz " found="
u_s_word:       .asciz " word="
u_s_shutdown:   .asciz "PROBE SHUTDOWN reason="
u_reason_exit:  .asciz "exit_after"
u_reason_cad:   .asciz "ctrl-alt-del"
u_s_n:          .asciz " n="

        .section .ubss, "aw", @nobits
        .balign 8
u_bootp:        .skip 8
u_boot_id:      .skip 8
u_id_rdrand:    .skip 8
u_ram_bytes:    .skip 8
u_ram_mib:      .skip 8
u_avail_mib:    .skip 8
u_mem_mib:      .skip 8
u_npages:       .skip 8
u_nranges:      .skip 8
u_ranges:       .skip MAX_RANGES * 16
u_t0:           .skip 8
u_fill_ms:      .skip 8
u_checksum:     .skip 8
u_timer_seen:   .skip 8
u_tick:         .skip 8
u_writes:       .skip 8     // page rewrites since the fill (W)
u_cursor:       .skip 8     // next page to rewrite (W mod N)
u_wraps:        .skip 8     // W div N
u_vcursor:      .skip 8     // first page of the next verification window
u_bad:          .skip 8
u_errs_printed: .skip 8
u_err_word:     .skip 8
u_err_exp:      .skip 8
u_err_found:    .skip 8
u_len:          .skip 8
u_digits:       .skip 32
u_line:         .skip 512
u_cmdline:      .skip CMDLINE_MAX
        .balign 16
ustack:         .skip 65536
ustack_top:
