# uart_regs: the 16550A at COM1 as a real chip behaves, register by register. Prints one line
# per check, "PASS name" or "FAIL name got=XX" (hex), then "DONE", then powers off.
# Every check that puts the UART in loopback restores normal mode before printing. The byte
# sent in loopback (0xA5) must never reach the host's side of the serial line.
	.code32
	.include "common.inc"

	.set LOOP_BYTE, 0xa5
	.set SLOW_DIVISOR, 384		# 115200 / 384 = 300 baud

# set_divisor N: program COM1's divisor latch with N, leaving the line at 8N1 with DLAB clear.
# Clobbers al, dx.
.macro set_divisor n
	outb COM1 + UART_LCR, LCR_DLAB | LCR_8N1
	outb COM1 + UART_DLL, (\n) & 0xff
	outb COM1 + UART_DLM, (\n) >> 8
	outb COM1 + UART_LCR, LCR_8N1
.endm

	program_start
	# Reset values, read before anything is written to the UART.
	inb COM1 + UART_IIR
	mov %al, reset_iir
	inb COM1 + UART_IER
	mov %al, reset_ier
	inb COM1 + UART_LCR
	mov %al, reset_lcr
	inb COM1 + UART_MCR
	mov %al, reset_mcr
	inb COM1 + UART_LSR
	mov %al, reset_lsr

	call uart_init
	mov reset_iir, %al
	check iir-reset, 0x01		# no interrupt pending, FIFOs off
	mov reset_ier, %al
	check ier-reset, 0x00
	mov reset_lcr, %al
	check lcr-reset, 0x00
	mov reset_mcr, %al
	check mcr-reset, 0x00
	mov reset_lsr, %al
	check lsr-reset, 0x60		# THRE | TEMT, no data

	# Scratch register keeps what was written.
	outb COM1 + UART_SCR, 0x5a
	inb COM1 + UART_SCR
	check scr-5a, 0x5a
	outb COM1 + UART_SCR, 0xa5
	inb COM1 + UART_SCR
	check scr-a5, 0xa5

	# Divisor latch: DLAB=1 maps offsets 0/1 to DLL/DLM; DLAB=0 maps them back to RBR/IER.
	# The divisor is restored to 1 before anything is printed.
	call wait_tx_empty
	outb COM1 + UART_LCR, LCR_DLAB | LCR_8N1
	outb COM1 + UART_DLL, 0x34
	outb COM1 + UART_DLM, 0x12
	inb COM1 + UART_DLL
	mov %al, %bl
	inb COM1 + UART_DLM
	mov %al, %bh
	inb COM1 + UART_LCR
	mov %al, %cl
	outb COM1 + UART_LCR, LCR_8N1
	inb COM1 + UART_IER
	mov %al, %ch
	set_divisor 1
	mov %bl, %al
	check dll-latch, 0x34
	mov %bh, %al
	check dlm-latch, 0x12
	mov %cl, %al
	check lcr-dlab, 0x83
	mov %ch, %al
	check dlab-off-ier, 0x00

	# LCR keeps all 8 bits (here 7E1: 7 bits, even parity, 1 stop).
	call wait_tx_empty
	outb COM1 + UART_LCR, 0x1a
	inb COM1 + UART_LCR
	mov %al, %bl
	outb COM1 + UART_LCR, LCR_8N1
	mov %bl, %al
	check lcr-rw, 0x1a

	# IER: bits 7:4 always read 0 on a 16550A.
	outb COM1 + UART_IER, 0xff
	inb COM1 + UART_IER
	mov %al, %bl
	outb COM1 + UART_IER, 0
	mov %bl, %al
	check ier-mask, 0x0f

	# FIFOs on (uart_init wrote FCR=0x07): IIR bits 7:6 = 11, no interrupt pending.
	inb COM1 + UART_IIR
	check iir-fifo, 0xc1

	# THR empty + ETBEI: IIR reports the THRE interrupt; reading IIR clears it.
	call wait_tx_empty
	outb COM1 + UART_IER, 0x02
	inb COM1 + UART_IIR
	mov %al, %bl
	inb COM1 + UART_IIR
	mov %al, %bh
	outb COM1 + UART_IER, 0
	mov %bl, %al
	check iir-thri, 0xc2
	mov %bh, %al
	check iir-thri-read-clears, 0xc1

	# MCR: bits 7:5 always read 0 on a 16550A (0xff includes loopback: nothing printed meanwhile).
	call wait_tx_empty
	outb COM1 + UART_MCR, 0xff
	inb COM1 + UART_MCR
	mov %al, %bl
	outb COM1 + UART_MCR, MCR_DTR_RTS
	mov %bl, %al
	check mcr-mask, 0x1f

	# Loopback: a byte written to THR comes back in RBR, with LSR.DR set until it is read.
	call wait_tx_empty
	outb COM1 + UART_MCR, MCR_LOOP
	call drain_rx
	outb COM1 + UART_THR, LOOP_BYTE
	mov $POLL_LIMIT, %ecx
1:	inb COM1 + UART_LSR
	test $LSR_DR, %al
	jnz 2f
	dec %ecx
	jnz 1b
2:	and $LSR_DR, %al
	mov %al, %bl
	inb COM1 + UART_RBR
	mov %al, %bh
	inb COM1 + UART_LSR
	and $LSR_DR, %al
	mov %al, %cl
	outb COM1 + UART_MCR, MCR_DTR_RTS
	mov %bl, %al
	check loop-dr, 0x01
	mov %bh, %al
	check loop-rbr, LOOP_BYTE
	mov %cl, %al
	check loop-dr-clear, 0x00

	# Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (MSR bits 7:4).
	call wait_tx_empty
	outb COM1 + UART_MCR, MCR_LOOP | 0x0f
	inb COM1 + UART_MSR
	and $0xf0, %al
	mov %al, msr_all
	outb COM1 + UART_MCR, MCR_LOOP | 0x01
	inb COM1 + UART_MSR
	and $0xf0, %al
	mov %al, msr_dtr
	outb COM1 + UART_MCR, MCR_LOOP | 0x02
	inb COM1 + UART_MSR
	and $0xf0, %al
	mov %al, msr_rts
	outb COM1 + UART_MCR, MCR_LOOP | 0x04
	inb COM1 + UART_MSR
	and $0xf0, %al
	mov %al, msr_out1
	outb COM1 + UART_MCR, MCR_LOOP | 0x08
	inb COM1 + UART_MSR
	and $0xf0, %al
	mov %al, msr_out2
	outb COM1 + UART_MCR, MCR_LOOP
	inb COM1 + UART_MSR
	and $0xf0, %al
	mov %al, msr_none
	# Delta bits: raising DSR sets DDSR (bit 1); reading MSR clears it.
	inb COM1 + UART_MSR
	outb COM1 + UART_MCR, MCR_LOOP | 0x01
	inb COM1 + UART_MSR
	mov %al, msr_delta
	inb COM1 + UART_MSR
	mov %al, msr_delta_after
	outb COM1 + UART_MCR, MCR_DTR_RTS
	mov msr_all, %al
	check msr-loop-all, 0xf0
	mov msr_dtr, %al
	check msr-loop-dtr-dsr, 0x20
	mov msr_rts, %al
	check msr-loop-rts-cts, 0x10
	mov msr_out1, %al
	check msr-loop-out1-ri, 0x40
	mov msr_out2, %al
	check msr-loop-out2-dcd, 0x80
	mov msr_none, %al
	check msr-loop-none, 0x00
	mov msr_delta, %al
	check msr-delta-ddsr, 0x22
	mov msr_delta_after, %al
	check msr-delta-read-clears, 0x20

	# THRE interrupt in FIFO mode (data sheet): a byte written to an idle transmitter goes
	# straight to the shift register, so LSR.THRE is set again at once, but the FIFO never held
	# two bytes, so the THRE interrupt comes one character time less a stop bit later. Done in
	# loopback at 300 baud (33 ms a character, far longer than the few exits between these
	# accesses); OUT2 is off, so the IRQ line stays down.
	call wait_tx_empty
	outb COM1 + UART_MCR, MCR_LOOP
	call drain_rx
	set_divisor SLOW_DIVISOR
	outb COM1 + UART_IER, 0x02
	inb COM1 + UART_IIR		# THRE set: THRI at once; the read clears it
	mov %al, thri_enable
	outb COM1 + UART_THR, LOOP_BYTE
	inb COM1 + UART_LSR
	and $0x60, %al
	mov %al, thri_lsr
	inb COM1 + UART_IIR
	mov %al, thri_held
	call wait_tx_empty		# one character time
	inb COM1 + UART_IIR
	mov %al, thri_late
	outb COM1 + UART_IER, 0
	call drain_rx
	set_divisor 1
	outb COM1 + UART_MCR, MCR_DTR_RTS
	mov thri_enable, %al
	check thri-on-enable, 0xc2
	mov thri_lsr, %al
	check thri-byte-lsr-thre, 0x20
	mov thri_held, %al
	check thri-byte-delayed, 0xc1
	mov thri_late, %al
	check thri-after-char-time, 0xc2

	mov $msg_done, %esi
	call puts
	call wait_tx_empty
	jmp poweroff

# wait_tx_empty: poll until LSR has THRE and TEMT (bounded). Clobbers eax, ecx, edx.
wait_tx_empty:
	mov $POLL_LIMIT, %ecx
1:	inb COM1 + UART_LSR
	and $0x60, %al
	cmp $0x60, %al
	je 2f
	dec %ecx
	jnz 1b
2:	ret

# drain_rx: read RBR while LSR.DR is set (bounded). Clobbers eax, ecx, edx.
drain_rx:
	mov $64, %ecx
1:	inb COM1 + UART_LSR
	test $LSR_DR, %al
	jz 2f
	inb COM1 + UART_RBR
	dec %ecx
	jnz 1b
2:	ret

	.section .rodata
msg_done:
	.asciz "DONE\n"

	.data
reset_iir:	.byte 0
reset_ier:	.byte 0
reset_lcr:	.byte 0
reset_mcr:	.byte 0
reset_lsr:	.byte 0
msr_all:	.byte 0
msr_dtr:	.byte 0
msr_rts:	.byte 0
msr_out1:	.byte 0
msr_out2:	.byte 0
msr_none:	.byte 0
msr_delta:	.byte 0
msr_delta_after: .byte 0
thri_enable:	.byte 0
thri_lsr:	.byte 0
thri_held:	.byte 0
thri_late:	.byte 0
